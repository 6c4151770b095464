"""The systemd units: `systemd-analyze verify` and the hardening score, offline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
UNITS = ["donkey-agent.service", "donkey-sim.service"]
pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze comes with Debian's systemd package (./dev.sh test installs it)",
)


def installed_copy(unit: str, tmp_path: Path) -> Path:
    """The unit as installed, with ExecStart pointing at this checkout's venv (verify needs it to exist)."""
    text = (ROOT / "systemd" / unit).read_text()
    venv_bin = Path(sys.executable).parent
    copy = tmp_path / unit
    copy.write_text(text.replace("/opt/donkey-agent/venv/bin/", f"{venv_bin}/"))
    return copy


@pytest.mark.parametrize("unit", UNITS)
def test_units_verify_cleanly(unit: str, tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(installed_copy(unit, tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_hardening_rates_2_0_or_better(unit: str, tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                             str(installed_copy(unit, tmp_path))], capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert score is not None, result.stdout[-500:]
    assert result.returncode == 0, f"exposure {score.group(1)} is above 2.0"
    assert float(score.group(1)) <= 2.0


def test_agent_unit_keeps_its_promises() -> None:
    text = (ROOT / "systemd" / "donkey-agent.service").read_text()
    promises = (
        "Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure", "RestartPreventExitStatus=78",
        "Wants=network-online.target keylime_agent.service", "DevicePolicy=closed", "LimitRTPRIO=",
        "LimitMEMLOCK=infinity", "RestrictRealtime=no",
        "ExecStopPost=/opt/donkey-agent/venv/bin/donkey-agent safe-stop",
        "SupplementaryGroups=i2c gpio video", "StateDirectory=", "ConfigurationDirectory=", "LogsDirectory=",
    )
    for line in promises:
        assert line in text, line
    assert "Requires=" not in text  # the car must start without the network or the Keylime agent
    # Every relaxation of the hardening says why, on the line above it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("RestrictRealtime=no") or line.startswith("ProtectProc="):
            assert lines[i - 1].startswith("# Relaxation:"), line
