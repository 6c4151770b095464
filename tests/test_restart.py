"""What survives a restart: a latched e-stop, and a crash while driving (held unless told to resume).

Real processes on the real twin: the agent is killed with SIGKILL (nothing of it runs on the way out), started
again, and what the restarted car does is read from the twin's own summary (its distance and last controls),
not from the agent's log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.parts import wait_for
from tests.test_cli import start_twin

ROOT = Path(__file__).parent.parent
AGENT = [sys.executable, "-m", "agent.cli"]
pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[twin]
port = {port}
[autopilot]
model = "{ROOT / 'models' / 'pilot.tflite'}"
[drive]
max_throttle = 0.4
{extra}
[drive.realtime]
priority = 0
lock_memory = false
[state]
directory = "{tmp_path / 'state'}"
""")
    return config


def start(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*AGENT, "run", "--config", str(config), *args], stderr=subprocess.PIPE, text=True)


def wait_ready(agent: subprocess.Popen[str]) -> list[str]:
    """Read the agent's log until it is ready; returns the lines read."""
    lines: list[str] = []
    assert agent.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = agent.stderr.readline()
        if not line:
            break
        lines.append(line)
        if " ready: " in line:
            return lines
    raise AssertionError("the agent did not become ready:\n" + "".join(lines))


class Twin:
    """The twin in its own process; ``cars()`` stops it and returns its own summary of every car it served."""

    def __init__(self, tmp_path: Path) -> None:
        self.summary = tmp_path / "summary.json"
        self.process, self.port = start_twin("--track", "generated_track", "--summary", str(self.summary))

    def cars(self) -> list[dict]:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(20)
        return json.loads(self.summary.read_text())["cars"]


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args, "--config", str(config)], capture_output=True, text=True, timeout=60)


def test_an_estop_survives_kill_and_restart_until_cleared(tmp_path: Path) -> None:
    twin = Twin(tmp_path)
    config = write_config(tmp_path, twin.port)
    try:
        first = start(config)
        wait_ready(first)
        time.sleep(2.0)  # driving
        estop = cli("estop", config=config)
        assert estop.returncode == 0, estop.stderr
        state = tmp_path / "state" / "safety.json"
        assert wait_for(lambda: state.exists() and "estop" in json.loads(state.read_text())["latched"], 2)
        first.send_signal(signal.SIGKILL)  # no clean exit, nothing of the agent runs on the way out
        first.wait(10)

        second = start(config, "--duration", "4")
        log = "".join(wait_ready(second))
        _, rest = second.communicate(timeout=60)
        log += rest
        assert second.returncode == 0, log[-3000:]
        assert "fault=estop, detail=latched before the restart: e-stop from signal" in log
        shown = json.loads(cli("faults", config=config).stdout)
        assert "estop" in shown["latched"] and shown["run"]["running"] is False  # a clean stop this time

        refused = cli("faults", "clear", config=config)  # stopped: the technician may clear it here
        assert refused.returncode == 0 and "cleared: estop" in refused.stdout
        third = start(config, "--duration", "3")
        _, log3 = third.communicate(timeout=60)
        assert third.returncode == 0 and "fault=estop" not in log3
    finally:
        for process in ("first", "second", "third"):
            agent = locals().get(process)
            if agent is not None and agent.poll() is None:
                agent.kill()
        result = twin.cars()
    assert len(result) == 3
    assert result[0]["distance_m"] > 0.5  # the first car drove
    assert result[1]["distance_m"] < 0.05 and result[1]["last_controls"] == [0.0, 0.0]  # restarted e-stopped
    assert result[2]["distance_m"] > 0.5  # cleared: drives again


@pytest.mark.parametrize("after_crash", ["hold", "resume"])
def test_a_crash_while_driving_holds_the_next_start_unless_told_to_resume(tmp_path: Path, after_crash: str) -> None:
    twin = Twin(tmp_path)
    config = write_config(tmp_path, twin.port, f'after_crash = "{after_crash}"')
    try:
        first = start(config)
        wait_ready(first)
        time.sleep(2.5)
        os.kill(first.pid, signal.SIGKILL)  # a crash while driving
        first.wait(10)
        second = start(config, "--duration", "4")
        _, log = second.communicate(timeout=60)
        running = cli("faults", config=config)
    finally:
        result = twin.cars()
    assert second.returncode == 0, log[-3000:]
    if after_crash == "hold":
        assert "fault=unclean_exit" in log and "ended without stopping while the car was driving" in log
        assert result[1]["distance_m"] < 0.05 and result[1]["last_controls"] == [0.0, 0.0]
        assert "unclean_exit" in json.loads(running.stdout)["latched"]  # still held for the next start
    else:
        assert "unclean_exit" not in log
        assert result[1]["distance_m"] > 0.5


def test_a_clean_stop_drives_again_and_two_agents_cannot_share_a_car(tmp_path: Path) -> None:
    twin = Twin(tmp_path)
    config = write_config(tmp_path, twin.port)
    try:
        first = start(config)
        wait_ready(first)
        twin_agent = subprocess.run([*AGENT, "run", "--config", str(config), "--duration", "2"], capture_output=True,
                                    text=True, timeout=60)
        busy = cli("faults", "clear", config=config)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
        second = start(config, "--duration", "3")
        _, log = second.communicate(timeout=60)
    finally:
        result = twin.cars()
    assert twin_agent.returncode == 69 and "another donkey-agent is running" in twin_agent.stderr
    assert busy.returncode == 1 and "the agent is running" in busy.stderr
    assert first.returncode == 0 and second.returncode == 0, log[-2000:]
    assert "unclean_exit" not in log
    assert result[-1]["distance_m"] > 0.5
