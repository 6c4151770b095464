"""ansible/: production-profile lint (offline), the vault example and the attestation bridge's template.

The playbook itself is applied for real in tests/test_provision_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from agent.attest.bridge import load_config

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
VAULT = ANSIBLE / "inventory" / "example" / "group_vars" / "cars" / "vault.yml"


def ansible_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1", **extra}


def documented_vault_password() -> str:
    """The example vault's dummy password, as docs/operations.md gives it."""
    match = re.search(r"example vault's password is `([^`]+)`", (REPO / "docs" / "operations.md").read_text())
    assert match, "docs/operations.md must document the example vault's password"
    return match.group(1)


def test_the_collections_are_vendored() -> None:
    """./dev.sh test fills ansible/collections from the PyPI `ansible` wheel; lint and the playbook need them."""
    collections = ANSIBLE / "collections" / "ansible_collections"
    for name in ("ansible/posix", "community/general", "community/docker"):
        assert (collections / name / "MANIFEST.json").exists(), f"run ansible/vendor-collections.sh ({name})"
    assert (collections / "community/docker/plugins/connection/nsenter.py").exists()


def test_ansible_lint_production_profile_offline_finds_nothing(tmp_path: Path) -> None:
    password = tmp_path / "vault-password"
    password.write_text(documented_vault_password() + "\n")
    # The vault password lets lint read the encrypted example too.
    result = subprocess.run([str(BIN / "ansible-lint"), "--nocolor"], cwd=ANSIBLE, capture_output=True, text=True,
                            timeout=300, env=ansible_env(ANSIBLE_VAULT_PASSWORD_FILE=str(password)))
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert result.returncode == 0, output[-6000:]
    summary = re.search(r"Passed: (\d+) failure\(s\), (\d+) warning\(s\) in (\d+) files processed", output)
    assert summary, output[-3000:]
    assert summary.group(1, 2) == ("0", "0")
    assert int(summary.group(3)) >= 30  # the roles, site.yml and the inventory were all read
    assert "Profile 'production' was required, and it passed" in output
    assert "Ignored exception" not in output  # e.g. a file lint could not decrypt or parse


def test_the_example_vault_opens_with_the_documented_dummy_password(tmp_path: Path) -> None:
    assert VAULT.read_text().startswith("$ANSIBLE_VAULT;1.1;AES256")  # committed encrypted
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(documented_vault_password() + "\n")
    bad.write_text("not-the-password\n")
    opened = subprocess.run([str(BIN / "ansible-vault"), "view", "--vault-password-file", str(good), str(VAULT)],
                            capture_output=True, text=True, timeout=60, env=ansible_env())
    assert opened.returncode == 0, opened.stderr
    secrets = yaml.safe_load(opened.stdout)
    assert set(secrets) == {"vault_donkey_agent_mqtt_keys", "vault_donkey_agent_mqtt_password"}
    assert "BEGIN" not in opened.stdout  # placeholders only: the repository never holds a private key
    refused = subprocess.run([str(BIN / "ansible-vault"), "view", "--vault-password-file", str(bad), str(VAULT)],
                             capture_output=True, text=True, timeout=60, env=ansible_env())
    assert refused.returncode != 0 and "Decryption failed" in refused.stderr


def test_the_bridge_template_renders_a_config_the_bridge_loads(tmp_path: Path) -> None:
    """donkey-attest-bridge.toml.j2 carries the webhook's TLS keys and the [policy] table, by the bridge's names."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True)
    environment.filters["to_json"] = json.dumps
    template = environment.from_string((ANSIBLE / "templates" / "donkey-attest-bridge.toml.j2").read_text())
    cars = [{"id": "car7", "keylime_uuid": "0f9c3c1e-4c1b-4a47-9d0e-9b6b1f6d6a01"}]
    defaults = tmp_path / "defaults.toml"
    defaults.write_text(template.render(donkey_fleet="lab", donkey_mqtt_url="mqtts://broker:8883", donkey_cars=cars))
    config = load_config(defaults)
    assert config.webhook_cert == Path("/etc/donkey-attest/webhook.crt")
    assert config.webhook_key == Path("/etc/donkey-attest/webhook.key")
    assert config.webhook_client_ca == Path("/var/lib/keylime/cv_ca/cacert.crt")  # only the verifier may post
    assert config.policy_name == "{uuid}" and config.policy_prefixes == ("/opt/donkey/models/",)
    assert config.policy_digests is None and config.policy_settle_timeout_s == 60.0
    assert config.cars == {"car7": cars[0]["keylime_uuid"]}

    chosen = tmp_path / "chosen.toml"
    chosen.write_text(template.render(
        donkey_fleet="lab", donkey_mqtt_url="mqtts://broker:8883", donkey_cars=cars,
        donkey_attest_webhook="0.0.0.0:8990", donkey_attest_webhook_cert="/srv/w.crt",
        donkey_attest_webhook_key="/srv/w.key", donkey_attest_webhook_client_ca="/srv/ca.crt",
        donkey_attest_revocation_cert="/srv/rev.crt", donkey_attest_policy_name="donkey-{car}",
        donkey_attest_policy_prefixes=["/opt/donkey/models/", "/srv/models/"],
        donkey_attest_policy_digests="/srv/released.sha256", donkey_attest_policy_settle_timeout_s=30))
    config = load_config(chosen)
    assert (config.webhook, config.webhook_cert, config.webhook_key, config.webhook_client_ca) == (
        "0.0.0.0:8990", Path("/srv/w.crt"), Path("/srv/w.key"), Path("/srv/ca.crt"))
    assert config.revocation_cert == Path("/srv/rev.crt")
    assert config.policy_name == "donkey-{car}" and config.policy_prefixes == ("/opt/donkey/models/", "/srv/models/")
    assert config.policy_digests == Path("/srv/released.sha256") and config.policy_settle_timeout_s == 30.0


@pytest.mark.parametrize("family", ["Debian", "RedHat"])
def test_every_os_vars_file_defines_the_same_names(family: str) -> None:
    """The roles read these names for any OS: a name missing from one file breaks only that OS's cars."""
    names = {path.stem: set(yaml.safe_load(path.read_text())) for path in (ANSIBLE / "vars").glob("*.yml")}
    assert set(names) == {"Debian", "RedHat"}
    assert names[family] == names["Debian"] | names["RedHat"]
