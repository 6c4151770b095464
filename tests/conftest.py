"""Shared fixtures. Each test gets its own temporary directory; nothing touches the user's files."""

from __future__ import annotations

import logging
import sys

import pytest

# donkeycar 5.x (our compatibility oracle) installs only on Python 3.11 with numpy < 2.
# Where it cannot be installed, its tests skip with that reason; on 3.11 it must be present.
DONKEYCAR_REQUIRED = sys.version_info[:2] == (3, 11)


@pytest.fixture(autouse=True)
def own_state_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test's agents keep their safety state (latched faults, run marker, outbox) apart from
    every other test's and from the user's: a latched e-stop must not leak into the next test."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def loggers_enabled() -> None:
    """Keylime's modules, imported in process by the attestation tests, configure logging with fileConfig, which
    disables every logger that exists at that moment (the agent's among them): later tests that read the agent's
    log would see nothing. Each test starts with every logger enabled again."""
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            logger.disabled = False


def require_donkeycar(module: str):
    """Import a donkeycar module: required on Python 3.11, a reasoned skip where it cannot install."""
    import importlib

    if DONKEYCAR_REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason="donkeycar 5.x supports only Python 3.11")


def import_donkeycar_tub():
    if DONKEYCAR_REQUIRED:
        from donkeycar.parts.tub_v2 import Tub
    else:
        tub_v2 = pytest.importorskip(
            "donkeycar.parts.tub_v2", reason="donkeycar 5.x supports only Python 3.11"
        )
        Tub = tub_v2.Tub
    logging.getLogger("donkeycar").setLevel(logging.WARNING)
    return Tub


def read_with_donkeycar(path) -> tuple[int, list[dict], object]:
    """Open a tub read-only with DonkeyCar's own Tub, return (len, records, manifest), and close it."""
    Tub = import_donkeycar_tub()
    tub = Tub(str(path), read_only=True)
    try:
        return len(tub), list(tub), tub.manifest
    finally:
        tub.close()
