"""Attestation self-checks for start-up, ``doctor`` and the retained state: rows of (name, ok, detail).

Why: attestation fails far from the car (at the verifier) and for reasons only the car can see (no TPM resource
manager, IMA without a TPM, a policy that never measures the agent's files, the Keylime agent stopped). These
checks name the reason locally. ``ok`` is True, False or None (could not tell, e.g. no systemd, a root-only file).

Read-only by design: nothing here extends a PCR, writes the IMA policy or talks to the TPM. Every path is a
parameter so tests run on fixture trees.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agent.attest import imalog
from agent.attest.keylime_conf import DEFAULT_SOURCES, KeylimeConfigError, read_agent_settings

SECURITYFS = Path("/sys/kernel/security")
IMA_DIR = SECURITYFS / "ima"
KEYLIME_UNIT = "keylime_agent"
# Filesystem magic numbers (include/uapi/linux/magic.h) for fsmagic= rules, by /proc/mounts type.
FS_MAGIC = {
    "ext2": 0xEF53, "ext3": 0xEF53, "ext4": 0xEF53, "tmpfs": 0x01021994, "devtmpfs": 0x01021994,
    "overlay": 0x794C7630, "proc": 0x9FA0, "sysfs": 0x62656572, "securityfs": 0x73636673, "devpts": 0x1CD1,
    "debugfs": 0x64626720, "tracefs": 0x74726163, "ramfs": 0x858458F6, "btrfs": 0x9123683E, "xfs": 0x58465342,
    "vfat": 0x4D44, "squashfs": 0x73717368, "f2fs": 0xF2F52010, "nfs": 0x6969, "nfs4": 0x6969,
    "cgroup": 0x27E0EB, "cgroup2": 0x63677270, "binfmt_misc": 0x42494E4D, "selinuxfs": 0xF97CFF8C,
    "smackfs": 0x43415D53, "efivarfs": 0xDE5E81E4, "nsfs": 0x6E736673, "pstore": 0x6165676C, "bpf": 0xCAFE4A11,
    "configfs": 0x62656570, "fuse": 0x65735546, "hugetlbfs": 0x958458F6, "mqueue": 0x19800202, "autofs": 0x0187,
}


class Row(NamedTuple):
    name: str
    ok: bool | None
    detail: str


Runner = Callable[[Sequence[str]], tuple[int, str]]


def _run(argv: Sequence[str]) -> tuple[int, str]:
    completed = subprocess.run(list(argv), capture_output=True, text=True, timeout=5, check=False)
    return completed.returncode, (completed.stdout.strip() or completed.stderr.strip())


def check_tpm(device: Path = Path("/dev/tpmrm0")) -> Row:
    if device.exists():
        kind = "character device" if device.is_char_device() else "present"
        return Row("tpm_resource_manager", True, f"{device} ({kind})")
    return Row("tpm_resource_manager", False, f"{device} missing: no TPM 2.0, or the kernel's resource manager is off "
                                              "(Pi 4: dtoverlay=tpm-slb9670)")


def _mounts(mounts: Path) -> list[tuple[str, str]]:
    """(mount point, fstype) from /proc/mounts; octal escapes (\\040 for a space) decoded."""
    result = []
    for line in mounts.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 3:
            result.append((fields[1].encode().decode("unicode_escape"), fields[2]))
    return result


def check_securityfs(mounts: Path = Path("/proc/mounts"), mountpoint: Path = SECURITYFS) -> Row:
    try:
        table = _mounts(mounts)
    except OSError as exc:
        return Row("securityfs", None, f"{mounts}: {exc.strerror or exc}")
    if any(point == str(mountpoint) and fstype == "securityfs" for point, fstype in table):
        return Row("securityfs", True, f"mounted at {mountpoint}")
    return Row("securityfs", False, f"not mounted at {mountpoint} (mount -t securityfs securityfs {mountpoint})")


def check_measurements(path: Path = IMA_DIR / "ascii_runtime_measurements") -> Row:
    name = "ima_measurements"
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
    except PermissionError:
        return Row(name, None, f"{path}: permission denied (root only; run doctor as root)")
    except OSError as exc:
        return Row(name, False, f"{path}: {exc.strerror or exc} (kernel without CONFIG_IMA, or securityfs not mounted)")
    if not first.strip():
        return Row(name, False, f"{path}: empty (IMA is not measuring)")
    try:
        entry = imalog.parse_line(first)
    except imalog.ImaLogError as exc:
        return Row(name, False, f"{path}: first entry unreadable: {exc}")
    if entry.path != "boot_aggregate":
        return Row(name, False, f"{path}: first entry is {entry.path!r}, not boot_aggregate")
    if not entry.consistent:
        return Row(name, False, f"{path}: boot_aggregate's template hash does not match its data")
    if not any(entry.digest):
        return Row(name, False, "boot_aggregate is all zeros: IMA started without a TPM (TPM-bypass, PCR 10 never "
                                "extended; on a Pi the SPI TPM probed too late, raspberrypi/linux#4364)")
    return Row(name, True, f"boot_aggregate first ({entry.template}, {entry.algo}:{entry.digest.hex()[:16]}…)")


@dataclass(frozen=True)
class Rule:
    text: str
    action: str
    conditions: dict[str, tuple[str, str]]  # key -> (operator, value)
    pcr: int | None


def parse_policy(text: str) -> list[Rule]:
    """IMA policy rules (Documentation/ABI/testing/ima_policy): ``action [condition ...] [option ...]``."""
    rules = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        action, *words = line.split()
        conditions: dict[str, tuple[str, str]] = {}
        pcr = None
        for word in words:
            for operator in ("=", "<", ">"):
                key, sep, value = word.partition(operator)
                if sep and key and "=" not in key:
                    break
            else:
                key, operator, value = word, "", ""
            if key == "pcr":
                pcr = int(value) if value.isdigit() else None
            elif key not in ("template", "permit_directio", "appraise_type", "appraise_flag", "appraise_algos",
                             "digest_type", "keyrings", "label"):
                conditions[key] = (operator, value)
        rules.append(Rule(line, action, conditions, pcr))
    return rules


def _compare(operator: str, value: str, actual: int) -> bool | None:
    try:
        expected = int(value, 0)
    except ValueError:
        return None
    return {"=": actual == expected, "<": actual < expected, ">": actual > expected}.get(operator)


def _matches(rule: Rule, *, uid: int, gid: int, owner: int, group: int, fstype: str) -> bool | None:
    """Whether ``rule`` applies to a read of the file by ``uid``; None when a condition cannot be decided here."""
    undecided = False
    for key, (operator, value) in rule.conditions.items():
        if key == "func":
            result: bool | None = value == "FILE_CHECK"
        elif key == "mask":
            result = value.lstrip("^") == "MAY_READ"
        elif key in ("uid", "euid"):
            result = _compare(operator, value, uid)
        elif key in ("gid", "egid"):
            result = _compare(operator, value, gid)
        elif key == "fowner":
            result = _compare(operator, value, owner)
        elif key == "fgroup":
            result = _compare(operator, value, group)
        elif key == "fsmagic":
            result = _compare("=", value, FS_MAGIC[fstype]) if fstype in FS_MAGIC else None
        elif key == "fsname":
            result = value == fstype
        else:  # fsuuid, obj_*/subj_* (LSM labels): not decidable from here
            result = None
        if result is False:
            return False
        undecided |= result is None
    return None if undecided else True


def coverage(rules: Iterable[Rule], target: Path, *, uid: int, gid: int, mounts: list[tuple[str, str]]) -> Row:
    """Whether the first rule matching a read of files under ``target`` by ``uid`` measures them into PCR 10."""
    name = f"ima_policy_covers:{target}"
    try:
        info = target.stat()
    except OSError as exc:
        return Row(name, False, f"{target}: {exc.strerror or exc}")
    candidates = [(point, fstype) for point, fstype in mounts
                  if str(target) == point or str(target).startswith(point.rstrip("/") + "/")]
    fstype = max(candidates, key=lambda item: len(item[0]))[1] if candidates else ""
    for rule in rules:
        if rule.action not in ("measure", "dont_measure"):
            continue
        applies = _matches(rule, uid=uid, gid=gid, owner=info.st_uid, group=info.st_gid, fstype=fstype)
        if applies is None:
            return Row(name, None, f"cannot decide rule {rule.text!r} here (LSM label or unknown condition)")
        if applies:
            if rule.action == "dont_measure":
                return Row(name, False, f"not measured: {rule.text!r} ({fstype or 'unknown'} filesystem) comes first")
            if rule.pcr not in (None, 10):
                return Row(name, False, f"measured into PCR {rule.pcr}, but Keylime replays PCR 10: {rule.text!r}")
            return Row(name, True, f"measured by {rule.text!r} (reads by uid {uid}, {fstype or 'unknown'} fs)")
    return Row(name, False, f"no rule measures reads by uid {uid} (ima_policy=tcb measures reads only for uid 0)")


def check_policy(targets: Iterable[Path], *, policy: Path = IMA_DIR / "policy", uid: int | None = None,
                 gid: int | None = None, mounts: Path = Path("/proc/mounts")) -> list[Row]:
    targets = list(targets)
    try:
        text = policy.read_text(encoding="utf-8", errors="replace")
    except PermissionError:
        return [Row("ima_policy", None, f"{policy}: permission denied (root only; run doctor as root)")]
    except OSError as exc:
        return [Row("ima_policy", None, f"{policy}: {exc.strerror or exc} (kernel without CONFIG_IMA_READ_POLICY)")]
    rules = parse_policy(text)
    try:
        table = _mounts(mounts)
    except OSError:
        table = []
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    return [coverage(rules, Path(os.path.realpath(target)), uid=uid, gid=gid, mounts=table) for target in targets]


def check_unit(unit: str = KEYLIME_UNIT, runner: Runner = _run) -> Row:
    name = "keylime_agent_unit"
    try:
        code, output = runner(["systemctl", "is-active", unit])
    except FileNotFoundError:
        return Row(name, None, "unknown: no systemctl (not a systemd machine)")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Row(name, None, f"unknown: systemctl failed: {exc}")
    state = output.splitlines()[0] if output else ""
    if code == 0 and state == "active":
        return Row(name, True, f"{unit} active (active is not registered: keylime_agent has no Type=notify)")
    if "not been booted with systemd" in output or "Failed to connect to bus" in output:
        return Row(name, None, f"unknown: systemd is not running here ({output.splitlines()[0]})")
    return Row(name, False, f"{unit} is {state or 'not active'} (systemctl start {unit})")


def check_keylime_config(sources: tuple[Path, ...] = DEFAULT_SOURCES, environ: dict[str, str] | None = None) -> Row:
    try:
        settings = read_agent_settings(sources, environ)
    except KeylimeConfigError as exc:
        return Row("keylime_agent_config", False, str(exc))
    return Row("keylime_agent_config", True, f"uuid {settings.uuid} (from {settings.origins['uuid']}), registrar "
                                             f"{settings.registrar}")


def run_all(targets: Iterable[Path], *, root: Path = Path("/"), uid: int | None = None, gid: int | None = None,
            unit: str = KEYLIME_UNIT, runner: Runner = _run, environ: dict[str, str] | None = None) -> list[Row]:
    """Every check; ``root`` re-roots the system paths (a fixture tree in tests)."""
    def at(path: Path) -> Path:
        return root / path.relative_to("/")

    return [
        check_keylime_config(tuple(at(source) for source in DEFAULT_SOURCES), environ),
        check_tpm(at(Path("/dev/tpmrm0"))),
        check_securityfs(at(Path("/proc/mounts")), SECURITYFS),
        check_measurements(at(IMA_DIR / "ascii_runtime_measurements")),
        *check_policy(targets, policy=at(IMA_DIR / "policy"), uid=uid, gid=gid, mounts=at(Path("/proc/mounts"))),
        check_unit(unit, runner),
    ]
