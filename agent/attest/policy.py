"""A Keylime runtime-policy fragment for this car: the agent's own files and its models, by the paths IMA logs.

Why: IMA measures every file the agent reads (its ``.py``/``.pyc`` files and its models, see
``ansible/templates/ima-policy.j2``), so the car's named runtime policy at the verifier must list their digests
or attestation fails (``runtime_policy_hash``, ``not_in_allowlist``). The car knows its files; the fleet owns the
policy: ``donkey-agent attest policy`` prints a fragment in exactly the shape Keylime's ``keylime-policy create
runtime`` writes (``keylime/ima/ima.py`` ``RUNTIME_POLICY_SCHEMA``, all keys present), and the fleet merges it
into the named policy (union; prune old digests only after a reboot, reference §8).

Paths are absolute and canonical (symlinks resolved): IMA logs the path by which a file was first opened, so the
agent must open its models by this same path. A policy covers interpreter, libraries and the rest of the system
only when merged with a rootfs policy (``keylime-policy create runtime --rootfs /``).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.attest import imalog

GENERATOR_LEGACY_ALLOWLIST = 3  # keylime.ima.ima.RUNTIME_POLICY_GENERATOR.LegacyAllowList, what keylime-policy sets
CODE_SUFFIXES = (".py", ".pyc")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_files(package_dir: Path) -> list[Path]:
    """The agent package's code as installed: every ``.py`` and any shipped ``.pyc`` (``__pycache__`` included)."""
    return sorted(path for path in package_dir.rglob("*") if path.is_file() and path.suffix in CODE_SUFFIXES)


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files as themselves, directories as every regular file below them (active and staged model directories)."""
    result: list[Path] = []
    for path in paths:
        if path.is_dir():
            result.extend(sorted(child for child in path.rglob("*") if child.is_file()))
        elif path.is_file():
            result.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return result


def boot_aggregate_digest(measurements: Path) -> str | None:
    """The hex digest of this boot's ``boot_aggregate`` (first entry), or None when the list is unreadable."""
    try:
        with measurements.open(encoding="utf-8", errors="replace") as handle:
            entry = imalog.parse_line(handle.readline())
    except (OSError, imalog.ImaLogError):
        return None
    return entry.digest.hex() if entry.path == "boot_aggregate" else None


def build(files: Iterable[Path], *, release: int = 0, boot_aggregates: Iterable[str] = (),
          excludes: Iterable[str] = (), timestamp: str | None = None) -> dict[str, Any]:
    """The fragment: every key of Keylime's schema, digests by canonical absolute path, lists sorted and unique."""
    digests: dict[str, set[str]] = {}
    for path in files:
        canonical = os.path.realpath(path)
        digests.setdefault(canonical, set()).add(sha256_file(Path(canonical)))
    boot = set(boot_aggregates)
    if boot:
        digests["boot_aggregate"] = boot
    return {
        "meta": {"version": 1, "generator": GENERATOR_LEGACY_ALLOWLIST,
                 "timestamp": timestamp if timestamp is not None else str(datetime.datetime.now())},
        "release": release,
        "digests": {path: sorted(values) for path, values in sorted(digests.items())},
        "excludes": sorted(set(excludes)),
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }


def for_agent(models: Iterable[Path], *, extra: Iterable[Path] = (), release: int = 0,
              measurements: Path | None = None, package_dir: Path | None = None) -> dict[str, Any]:
    """The fragment ``donkey-agent attest policy`` prints: this installation's code, the models, extra paths."""
    import agent

    package = package_dir if package_dir is not None else Path(agent.__file__).resolve().parent
    files = package_files(package) + expand(models) + expand(extra)
    boot = boot_aggregate_digest(measurements) if measurements is not None else None
    return build(files, release=release, boot_aggregates=[boot] if boot else [])
