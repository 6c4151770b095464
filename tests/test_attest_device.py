"""The Keylime agent's settings (rust-keylime's precedence) and the attestation self-checks, on fixture trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.attest import imalog
from agent.attest.keylime_conf import DEFAULT_UUID, KeylimeConfigError, read_agent_settings
from agent.attest.selfcheck import Row, check_measurements, check_policy, check_unit, run_all

UUID_A = "a1b2c3d4-0000-4000-8000-000000000001"
UUID_B = "a1b2c3d4-0000-4000-8000-000000000002"


def tree(root: Path) -> tuple[Path, ...]:
    sources = (root / "usr/etc/keylime/agent.conf", root / "usr/etc/keylime/agent.conf.d",
               root / "etc/keylime/agent.conf", root / "etc/keylime/agent.conf.d")
    for directory in (sources[1], sources[3]):
        directory.mkdir(parents=True)
    return sources


def test_precedence_files_snippets_environment(tmp_path):
    sys_conf, sys_d, conf, conf_d = tree(tmp_path)
    sys_conf.write_text(f'[agent]\nuuid = "{UUID_A}"\nregistrar_ip = "10.0.0.1"\nregistrar_port = 1\n')
    (sys_d / "50-port.conf").write_text("[agent]\nregistrar_port = 2\n")
    conf.write_text('[agent]\nregistrar_ip = "10.0.0.3"\n')
    (conf_d / "20-b.conf").write_text("[agent]\nregistrar_port = 4\n")
    (conf_d / "10-a.conf").write_text("[agent]\nregistrar_port = 3\ncontact_port = 9\n")
    settings = read_agent_settings((sys_conf, sys_d, conf, conf_d), {})
    assert settings.uuid == UUID_A and settings.registrar == "10.0.0.3:4"  # snippets in name order, last wins
    assert settings.origins["registrar_port"] == str(conf_d / "20-b.conf")
    env = {"KEYLIME_AGENT_REGISTRAR_PORT": "8891", "KEYLIME_AGENT_UUID": UUID_B, "KEYLIME_DIR": "/srv/keylime"}
    settings = read_agent_settings((sys_conf, sys_d, conf, conf_d), env)
    assert (settings.uuid, settings.registrar_port, settings.origins["uuid"]) == (UUID_B, 8891, "KEYLIME_AGENT_UUID")
    assert settings.keylime_dir == Path("/srv/keylime") and settings.contact_port == 9


def test_keylime_agent_config_replaces_the_system_files(tmp_path):
    sys_conf, sys_d, conf, conf_d = tree(tmp_path)
    conf.write_text(f'[agent]\nuuid = "{UUID_A}"\nregistrar_ip = "10.0.0.3"\n')
    only = tmp_path / "only.conf"
    only.write_text(f'[agent]\nuuid = "{UUID_B}"\n')
    settings = read_agent_settings((sys_conf, sys_d, conf, conf_d), {"KEYLIME_AGENT_CONFIG": str(only)})
    assert settings.uuid == UUID_B and settings.registrar_ip == "127.0.0.1" and settings.files == (only,)
    with pytest.raises(KeylimeConfigError, match=r"KEYLIME_AGENT_CONFIG=.*no such file"):
        read_agent_settings((conf,), {"KEYLIME_AGENT_CONFIG": str(tmp_path / "missing.conf")})


@pytest.mark.parametrize("value,message", [
    ("generate", "new UUID on every start"),
    ("hash_ek", "without reading the TPM"),
    ("not-a-uuid", "is not a UUID"),
    (DEFAULT_UUID, "built-in default"),
])
def test_refuses_a_uuid_the_car_cannot_know(tmp_path, value, message):
    conf = tmp_path / "agent.conf"
    conf.write_text(f'[agent]\nuuid = "{value}"\n')
    with pytest.raises(KeylimeConfigError, match=message) as info:
        read_agent_settings((conf,), {})
    assert str(info.value).startswith(f"{conf}: uuid:")
    with pytest.raises(KeylimeConfigError, match=r"^KEYLIME_AGENT_UUID: uuid:"):
        read_agent_settings((), {"KEYLIME_AGENT_UUID": value})


def test_default_uuid_allowed_only_when_asked(tmp_path):
    assert read_agent_settings((), {}, allow_default_uuid=True).uuid == DEFAULT_UUID


@pytest.mark.parametrize("text,message", [
    ("[agent\n", "not valid TOML"),
    ('[agent]\nregistrar_port = "http"\n', "registrar_port: expected a port number"),
    ("[agent]\nregistrar_port = 70000\n", "registrar_port: 70000 is not a port"),
    ("agent = 3\n", "expected the \\[agent\\] table"),
    ('[agent]\nenable_agent_mtls = "maybe"\n', "enable_agent_mtls: expected true or false"),
])
def test_errors_name_the_file_and_key(tmp_path, text, message):
    conf = tmp_path / "agent.conf"
    conf.write_text(text)
    with pytest.raises(KeylimeConfigError, match=message) as info:
        read_agent_settings((conf,), {"KEYLIME_AGENT_UUID": UUID_A})
    assert str(conf) in str(info.value)


def test_environment_values_are_typed(tmp_path):
    with pytest.raises(KeylimeConfigError, match=r"^KEYLIME_AGENT_ENABLE_AGENT_MTLS: enable_agent_mtls"):
        read_agent_settings((), {"KEYLIME_AGENT_UUID": UUID_A, "KEYLIME_AGENT_ENABLE_AGENT_MTLS": "maybe"})
    settings = read_agent_settings((), {"KEYLIME_AGENT_UUID": UUID_A, "KEYLIME_AGENT_ENABLE_AGENT_MTLS": "false",
                                        "KEYLIME_AGENT_IMA_ML_PATH": "var/ima.log"})
    assert settings.settings["enable_agent_mtls"] is False and settings.ima_ml_path == Path("/var/ima.log")


# Self-checks on a fixture tree.

POLICY_MEASURES_AGENT = """\
# keep the pseudo filesystems out
dont_measure fsmagic=0x9fa0
dont_measure fsmagic=0x62656572
dont_measure fsmagic=0x01021994
measure func=BPRM_CHECK
measure func=MMAP_CHECK mask=MAY_EXEC
measure func=FILE_CHECK mask=^MAY_READ uid=0
measure func=FILE_CHECK mask=MAY_READ uid={uid} template=ima-sig
"""


@pytest.fixture
def machine(tmp_path):
    """A fixture root: keylime conf, /dev/tpmrm0, /proc/mounts, an IMA list and policy; code and model dirs."""
    root = tmp_path / "root"
    (root / "etc/keylime").mkdir(parents=True)
    (root / "etc/keylime/agent.conf").write_text(f'[agent]\nuuid = "{UUID_A}"\nregistrar_ip = "fleet.lan"\n')
    (root / "dev").mkdir()
    (root / "dev/tpmrm0").write_text("")
    (root / "proc").mkdir()
    (root / "proc/mounts").write_text("/dev/root / ext4 rw 0 0\nsecurityfs /sys/kernel/security securityfs rw 0 0\n"
                                      "tmpfs /run tmpfs rw 0 0\n")
    ima = root / "sys/kernel/security/ima"
    ima.mkdir(parents=True)
    boot = imalog.boot_aggregate(bytes(range(32)))
    (ima / "ascii_runtime_measurements").write_text(boot.line() + "\n" + imalog.entry(bytes(32), "/x").line() + "\n")
    (ima / "policy").write_text(POLICY_MEASURES_AGENT.format(uid=1234))
    code = tmp_path / "opt/donkey/agent"
    models = tmp_path / "opt/donkey/models"
    code.mkdir(parents=True)
    models.mkdir(parents=True)
    return root, code, models


def ok_runner(argv):
    assert argv == ["systemctl", "is-active", "keylime_agent"]
    return 0, "active"


def test_all_checks_pass_on_a_good_machine(machine):
    root, code, models = machine
    rows = run_all([code, models], root=root, uid=1234, gid=1234, runner=ok_runner, environ={})
    assert all(isinstance(row, Row) for row in rows)
    assert [row.name for row in rows] == ["keylime_agent_config", "tpm_resource_manager", "securityfs",
                                          "ima_measurements", f"ima_policy_covers:{os.path.realpath(code)}",
                                          f"ima_policy_covers:{os.path.realpath(models)}", "keylime_agent_unit"]
    assert all(row.ok for row in rows), rows
    assert "registrar fleet.lan:8890" in rows[0].detail


def by_name(rows, prefix):
    return next(row for row in rows if row.name.startswith(prefix))


def test_each_check_can_fail(machine):
    root, code, _models = machine
    (root / "dev/tpmrm0").unlink()
    (root / "proc/mounts").write_text("/dev/root / ext4 rw 0 0\n")
    (root / "etc/keylime/agent.conf").write_text('[agent]\nuuid = "generate"\n')
    (root / "sys/kernel/security/ima/policy").write_text(POLICY_MEASURES_AGENT.format(uid=0))
    rows = run_all([code], root=root, uid=1234, gid=1234, runner=lambda argv: (3, "inactive"), environ={})
    failed = {row.name.split(":")[0] for row in rows if row.ok is False}
    assert failed == {"keylime_agent_config", "tpm_resource_manager", "securityfs", "ima_policy_covers",
                      "keylime_agent_unit"}
    assert "ima_policy=tcb" in by_name(rows, "ima_policy_covers").detail


@pytest.mark.parametrize("first,message", [
    (None, "empty"),
    ("garbage", "unreadable"),
    (imalog.entry(bytes(32), "/usr/bin/python3").line(), "not boot_aggregate"),
    (imalog.boot_aggregate().line(), "all zeros"),
    (imalog.boot_aggregate(bytes(range(32))).line().replace("sha256:00", "sha256:ff"), "does not match"),
])
def test_measurement_list_checks(tmp_path, first, message):
    path = tmp_path / "ascii_runtime_measurements"
    path.write_text("" if first is None else first + "\n")
    row = check_measurements(path)
    assert row.ok is False and message in row.detail, row


def test_unreadable_measurements_are_unknown(tmp_path):
    path = tmp_path / "ascii_runtime_measurements"
    path.write_text("x")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: check the classification directly
        from unittest import mock

        with mock.patch("pathlib.Path.open", side_effect=PermissionError("denied")):
            row = check_measurements(path)
    else:
        row = check_measurements(path)
    assert row.ok is None and "permission denied" in row.detail
    assert check_measurements(tmp_path / "missing").ok is False


def test_policy_order_and_filesystems(machine, tmp_path):
    root, _code, models = machine
    mounts = root / "proc/mounts"
    policy = root / "sys/kernel/security/ima/policy"
    (policy).write_text("dont_measure fsmagic=0xef53\n" + POLICY_MEASURES_AGENT.format(uid=1234))
    row = check_policy([models], policy=policy, uid=1234, gid=1, mounts=mounts)[0]
    assert row.ok is False and "fsmagic=0xef53" in row.detail  # first match wins: ext4 is excluded
    policy.write_text("measure func=FILE_CHECK mask=MAY_READ uid=1234 pcr=11\n")
    row = check_policy([models], policy=policy, uid=1234, gid=1, mounts=mounts)[0]
    assert row.ok is False and "PCR 11" in row.detail
    policy.write_text("measure func=FILE_CHECK mask=MAY_READ obj_type=donkey_model_t\n")
    assert check_policy([models], policy=policy, uid=1234, gid=1, mounts=mounts)[0].ok is None
    policy.write_text(f"measure func=FILE_CHECK mask=MAY_READ fowner={models.stat().st_uid}\n")
    assert check_policy([models], policy=policy, uid=1234, gid=1, mounts=mounts)[0].ok is True
    policy.write_text("measure func=FILE_CHECK mask=MAY_READ uid<1000\n")
    assert check_policy([models], policy=policy, uid=1234, gid=1, mounts=mounts)[0].ok is False
    policy.chmod(0o644)
    assert check_policy([models], policy=tmp_path / "none", uid=1234, gid=1, mounts=mounts)[0].ok is None


@pytest.mark.parametrize("runner,expected", [
    (lambda argv: (3, "inactive"), False),
    (lambda argv: (4, "unknown"), False),
    (lambda argv: (1, "System has not been booted with systemd as init system (PID 1). Can't operate."), None),
])
def test_unit_states(runner, expected):
    assert check_unit(runner=runner).ok is expected


def test_no_systemctl_is_unknown():
    def missing(argv):
        raise FileNotFoundError("systemctl")
    row = check_unit(runner=missing)
    assert row.ok is None and "unknown" in row.detail
