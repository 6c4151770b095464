"""The real agent records a tub onto a disk that fills up while it drives (a real 512 KiB tmpfs, as root).

Driving goes on (the twin's own summary says the car kept moving), the loss is counted and reported (the final
log line, from the recorder's counters), the tub on the full disk stays readable by DonkeyCar's own reader with
exactly the records reported written, and the agent exits 0.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_with_donkeycar
from tests.test_cli import start_twin
from tests.test_tub_full_disk import small_disk  # noqa: F401 - the fixture

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def test_recording_onto_a_full_disk_never_stops_the_car(tmp_path: Path, small_disk: Path) -> None:  # noqa: F811
    summary = tmp_path / "summary.json"
    twin, port = start_twin("--track", "generated_track", "--summary", str(summary))
    tub = small_disk / "tub"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--sim", f"127.0.0.1:{port}", "--model",
             str(ROOT / "models" / "pilot.tflite"), "--record", str(tub), "--duration", "8"],
            capture_output=True, text=True, timeout=120)
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
    log = result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    found = re.search(r"recorded (\d+) records to \S+ \((\d+) lost: (\d+) dropped, (\d+) rejected, (\d+) failed", log)
    assert found is not None, log[-3000:]
    written, lost, _, _, failed = map(int, found.groups())
    assert written > 10 and lost > 20 and failed > 0  # the disk filled part-way through
    assert "No space left on device" in log
    count, records, _ = read_with_donkeycar(tub)
    assert count == written == len(records)  # readable, and exactly what was reported
    cars = json.loads(summary.read_text())["cars"]
    assert cars[0]["distance_m"] > 3.0 and cars[0]["off_track_events"] == 0  # it kept driving throughout
