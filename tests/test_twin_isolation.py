"""One peer cannot degrade another car's drive: the shipped model drives two clean laps at >= 19 Hz
while a never-reading flooder, a 1920x1080 PNG camera, 200 idle connections and a load_scene flood
all run against the same twin, whose memory stays bounded.

Everything is measured on the twin's side: its per-car summary (frames sent over the time
connected, laps, off-track events) and its resident memory from /proc. The agent is the real
``donkey-agent run`` process with ``models/pilot.tflite``, as a user runs it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.twin_peers import HostilePeers, TwinProcess

ROOT = Path(__file__).parent.parent
LAPS = 2
MIN_HZ = 19.0
RSS_BOUND_MB = 250.0  # the twin at rest is ~80 MB; measured peaks under this attack: docs/performance.md
pytestmark = pytest.mark.slow


def start_agent(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    config = tmp / "agent.toml"
    config.write_text(f"[drive.realtime]\npriority = 0\n[state]\ndirectory = \"{tmp / 'state'}\"\n")
    log = (tmp / "agent.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim",
                             f"127.0.0.1:{port}", "--model", str(ROOT / "models" / "pilot.tflite")],
                            stderr=log, stdout=log)


def car_named(summary: dict[str, Any], name: str) -> dict[str, Any]:
    (car,) = [car for car in summary["cars"] if car["car_name"] == name]
    return car


def test_hostile_peers_cannot_degrade_the_shipped_model_driving_another_car(tmp_path: Path) -> None:
    twin = TwinProcess("--track", "generated_track", summary=tmp_path / "summary.json")
    agent = start_agent(twin.port, tmp_path)
    peers = HostilePeers(twin.port)
    try:
        assert twin.wait_for(r"car 1 loaded", 60), "the agent's car was not loaded"
        started = time.monotonic()
        peers.start()
        lap_line = None
        while lap_line is None and time.monotonic() - started < 150:
            twin.rss_mb()
            lap_line = twin.wait_for(rf"car 1 lap {LAPS} in", 0.5)
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
        attacked_s = time.monotonic() - started
    finally:
        peers.stop()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        summary = twin.stop()
    assert lap_line is not None, f"{LAPS} laps not done in {attacked_s:.0f} s:\n" + "\n".join(twin.lines[-30:])

    car = car_named(summary, "donkey-agent")
    report = (f"agent's car: {car['telemetry_hz']} Hz, {car['laps']} laps {car['lap_times']}, "
              f"{car['off_track_events']} off-track, skipped {car['frames_skipped']}; twin peak RSS "
              f"{twin.peak_rss_mb:.0f} MB; refused {summary['twin']['connections_refused']}; lanes "
              f"{summary['twin']['frames_by_lane']}")
    print(report)
    assert car["telemetry_hz"] >= MIN_HZ, report
    assert car["laps"] >= LAPS and car["off_track_events"] == 0, report
    assert twin.peak_rss_mb < RSS_BOUND_MB, report

    # Each hostile peer really ran, and was contained.
    cars = summary["cars"]
    camera = next(c for c in cars if c["camera"].endswith("PNG"))
    assert camera["camera"] == "739x415 PNG"  # 1920x1080 scaled to within 640x480 pixels
    assert camera["frames_throttled"] > 0  # and sent less often: over its share of the CPU
    flooder = next(c for c in cars if "inbound flood" in c["problems"])
    assert flooder["frames_dropped"] > 0 and "slow reader" in flooder["problems"]
    assert summary["twin"]["connections_refused"] >= 150
    flood_peer, loads = Counter(c["peer"] for c in cars).most_common(1)[0]
    assert 3 <= loads <= attacked_s + 3, loads  # loads spaced a second apart, whatever the flood
    assert {c["geometry"] for c in cars if c["peer"] == flood_peer} >= {"generated_road", "warehouse"}
    assert peers.sent["flooder"] > 1000 and peers.received["big_camera"] > 0
