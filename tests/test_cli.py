"""The `donkey-sim` and `donkey-agent` commands as a user runs them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import import_donkeycar_tub, read_with_donkeycar

SIM = [sys.executable, "-m", "simulator"]


def start_twin(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([*SIM, "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"donkey-sim: listening on [\d.]+:(\d+)", line)
        if match:
            return proc, int(match.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the twin did not start")


@pytest.mark.donkeycar
@pytest.mark.slow
def test_record_command_writes_a_tub_and_says_where(tmp_path: Path) -> None:
    import_donkeycar_tub()
    out = tmp_path / "data" / "tub1"
    result = subprocess.run([*SIM, "record", "--out", str(out), "--laps", "1", "--noise", "0.05", "--seed", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"tub: {out.resolve()}" in result.stdout
    count = int(re.search(r"records: (\d+)", result.stdout).group(1))
    assert "recording generated_track" in result.stderr  # progress was shown
    assert read_with_donkeycar(out)[0] == count > 400


@pytest.mark.slow
def test_twin_summary_on_sigterm_after_an_expert_drive_over_the_protocol(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    twin, port = start_twin("--track", "generated_track", "--time-scale", "4", "--summary", str(summary))
    try:
        drive = subprocess.run([*SIM, "drive", "--sim", f"127.0.0.1:{port}", "--laps", "1",
                                "--record", str(tmp_path / "tub")], capture_output=True, text=True, timeout=120)
        assert drive.returncode == 0, drive.stderr
        assert "laps: 1" in drive.stdout
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=20)
    assert twin.returncode == 0
    data = json.loads(summary.read_text())
    assert data["twin"]["stop_reason"] == "SIGTERM"
    (car,) = data["cars"]
    assert car["laps"] >= 1 and car["off_track_events"] == 0
    assert len(car["lap_times"]) == car["laps"]
    assert car["distance_m"] > 40 and car["max_abs_cte"] < 0.3
    assert car["car_name"] == "expert"


def test_twin_writes_its_summary_when_its_duration_ends(tmp_path: Path) -> None:
    summary = tmp_path / "s.json"
    twin, _ = start_twin("--duration", "1", "--summary", str(summary))
    assert twin.wait(timeout=30) == 0
    data = json.loads(summary.read_text())
    assert data["cars"] == [] and "duration" in data["twin"]["stop_reason"]


def test_bad_arguments_are_explained() -> None:
    result = subprocess.run([*SIM, "--track", "nowhere"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown track 'nowhere'" in result.stderr and "generated_track" in result.stderr
    result = subprocess.run([*SIM, "drive", "--sim", "localhost"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


def test_drive_reports_an_unreachable_simulator() -> None:
    result = subprocess.run([*SIM, "drive", "--sim", "127.0.0.1:9", "--laps", "1", "--connect-timeout", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot reach the simulator at 127.0.0.1:9" in result.stderr


def test_agent_tub_info(tmp_path: Path) -> None:
    from simulator.record import record_in_process

    record_in_process(tmp_path / "tub", laps=1, max_sim_seconds=2.0)
    result = subprocess.run([sys.executable, "-m", "agent.cli", "tub", "info", str(tmp_path / "tub")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["records"] == 40 and info["inputs"]["cam/image_array"] == "image_array"
    missing = subprocess.run([sys.executable, "-m", "agent.cli", "tub", "info", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "not a readable Tub v2" in missing.stderr
