"""The supervisor under a fake systemd: sd_notify readiness, status, watchdog, stopping, reload."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig, load
from agent.run import Daemon
from tests.fakes.parts import TwinRig, wait_for

ROOT = Path(__file__).parent.parent
WATCHDOG_USEC = 400_000  # systemd would ping-check every 0.4 s; we must ping at <= 0.2 s


class FakeSystemd:
    """A NOTIFY_SOCKET datagram socket that records (time, message) like systemd receives them."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def times(self, prefix: str) -> list[float]:
        return [t for t, m in self.messages if m.startswith(prefix)]

    def first(self, prefix: str) -> float | None:
        times = self.times(prefix)
        return times[0] if times else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield fake
    fake.close()


def config_for_tests(tmp_path: Path, extra: str = "") -> tuple[AgentConfig, Path]:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[drive]
max_throttle = 0.4
[drive.realtime]
priority = 0
lock_memory = false
[autopilot]
model = "{ROOT / 'models' / 'pilot.tflite'}"
{extra}""")
    return load(path), path


def run_supervisor(supervisor: Daemon, script) -> int:
    """Run the supervisor in this (main) thread; ``script`` drives the test from another thread."""
    failures: list[BaseException] = []

    def driver() -> None:
        try:
            script()
        except BaseException as exc:
            failures.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=driver, daemon=True)
    thread.start()
    import asyncio

    code = asyncio.run(supervisor.run())
    thread.join(5)
    if failures:
        raise failures[0]
    return code


def wait_until(predicate, timeout: float = 20.0) -> None:
    assert wait_for(predicate, timeout, interval=0.02), "timed out"


def test_ready_after_warm_up_then_status_watchdog_and_stopping(tmp_path: Path, systemd: FakeSystemd) -> None:
    config, path = config_for_tests(tmp_path)
    rig = TwinRig()
    supervisor = Daemon(config, config_path=path, build=lambda config, stack: (rig, rig))
    seen: dict[str, object] = {}

    def script() -> None:
        wait_until(lambda: systemd.first("READY=1") is not None)
        core = supervisor.core
        assert core is not None
        seen["warm_at_ready"] = core.ready.is_set() and core.pilot is not None and rig.armed_at is not None
        time.sleep(1.5)

    code = run_supervisor(supervisor, script)
    rig.close()
    assert code == 0
    assert seen["warm_at_ready"]
    ready = systemd.first("READY=1")
    extend = systemd.first("EXTEND_TIMEOUT_USEC=")
    assert extend is not None and ready is not None and extend < ready
    assert all(t > ready for t in systemd.times("WATCHDOG=1"))  # no ping before READY
    pings = systemd.times("WATCHDOG=1")
    assert len(pings) >= 5
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6 * 0.75  # well inside the watchdog period
    statuses = [m for _, m in systemd.messages if m.startswith("STATUS=local, ")]
    assert statuses and "Hz" in statuses[-1] and "faults: none" in statuses[-1]
    stopping = systemd.first("STOPPING=1")
    assert stopping is not None and stopping > pings[-1] - 0.3
    assert rig.writes[-1][1:] == (0.0, 0.0)  # neutral after stop


def test_no_watchdog_while_the_drive_core_is_stalled(tmp_path: Path, systemd: FakeSystemd) -> None:
    config, path = config_for_tests(tmp_path)
    rig = TwinRig()
    supervisor = Daemon(config, config_path=path, build=lambda config, stack: (rig, rig))
    marks: dict[str, float] = {}

    def script() -> None:
        wait_until(lambda: len(systemd.times("WATCHDOG=1")) >= 3)
        marks["hang"] = time.monotonic()
        rig.hang.set()  # the actuator write blocks: the core stops cycling
        time.sleep(2.0)
        marks["release"] = time.monotonic()
        rig.hang.clear()
        wait_until(lambda: any(t > marks["release"] for t in systemd.times("WATCHDOG=1")), timeout=5)

    code = run_supervisor(supervisor, script)
    rig.close()
    assert code == 0
    during = [t for t in systemd.times("WATCHDOG=1") if marks["hang"] + 0.8 < t < marks["release"]]
    assert during == []  # systemd would have restarted us: 2 s without a ping against 0.4 s
    assert any(t > marks["release"] for t in systemd.times("WATCHDOG=1"))  # and pings resume


def test_sighup_applies_live_changes_and_names_the_rest(tmp_path: Path, systemd: FakeSystemd,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    config, path = config_for_tests(tmp_path)
    rig = TwinRig()
    supervisor = Daemon(config, config_path=path, build=lambda config, stack: (rig, rig))
    seen: dict[str, int] = {}

    def script() -> None:
        wait_until(lambda: systemd.first("READY=1") is not None)
        path.write_text(path.read_text().replace("max_throttle = 0.4", "max_throttle = 0.2\nrate_hz = 30")
                        + "[logging]\nlevel = 'warning'\n")
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: supervisor.core is not None and supervisor.core.status()["max_throttle"] == 0.2, timeout=5)
        seen["level"] = logging.getLogger().level
        logging.getLogger().setLevel(logging.INFO)  # so the test can read what the next reload says
        path.write_text("[drive\n")  # a broken file on the next reload changes nothing
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.3)

    with caplog.at_level("INFO", logger="donkey-agent"):
        code = run_supervisor(supervisor, script)
    rig.close()
    assert code == 0
    text = caplog.text
    assert "applied live: drive.max_throttle, logging.level; needs a restart: drive.rate_hz" in text
    assert seen["level"] == logging.WARNING
    assert "keeping the running config, the file is invalid" in text and "not valid TOML" in text


def test_sighup_keeps_command_line_overrides_and_names_only_real_changes(
        tmp_path: Path, systemd: FakeSystemd, caplog: pytest.LogCaptureFixture) -> None:
    config, path = config_for_tests(tmp_path)  # the file says max_throttle = 0.4
    overrides = {"drive.max_throttle": 0.1}  # --max-throttle 0.1
    rig = TwinRig()
    supervisor = Daemon(config.with_overrides(overrides), config_path=path, overrides=overrides,
                        build=lambda config, stack: (rig, rig))
    seen: dict[str, float] = {}

    def script() -> None:
        wait_until(lambda: systemd.first("READY=1") is not None)
        os.kill(os.getpid(), signal.SIGHUP)  # the file did not change
        time.sleep(0.5)
        assert supervisor.core is not None
        seen["after_reload"] = supervisor.core.status()["max_throttle"]
        seen["throttle"] = max(abs(t) for _, _, t in rig.writes_after(time.monotonic() - 0.3))

    with caplog.at_level("INFO", logger="donkey-agent"):
        code = run_supervisor(supervisor, script)
    rig.close()
    assert code == 0
    assert seen["after_reload"] == 0.1 and seen["throttle"] <= 0.1 + 1e-9  # never the file's 0.4
    assert "applied live: nothing; needs a restart: nothing" in caplog.text


@pytest.mark.parametrize("phase", ["opening the hardware", "waiting for the first frame"])
def test_sigterm_during_warm_up_stops_within_a_second(tmp_path: Path, systemd: FakeSystemd, phase: str) -> None:
    config, path = config_for_tests(tmp_path)
    rig = TwinRig()
    rig.pause_frames.set()
    time.sleep(0.1)
    rig.slot.latest = None  # no frame will come

    def build(config, stack):
        if phase == "opening the hardware":
            time.sleep(30)  # a simulator that does not answer
        return rig, rig

    supervisor = Daemon(config, config_path=path, build=build)
    marks: dict[str, float] = {}

    def script() -> None:
        time.sleep(1.5)
        marks["term"] = time.monotonic()

    started = time.monotonic()
    code = run_supervisor(supervisor, script)
    ended = time.monotonic()
    rig.close()
    assert code == 0 and systemd.first("READY=1") is None
    assert ended - marks["term"] < 1.0, f"took {ended - marks['term']:.2f} s after SIGTERM"
    assert ended - started < 5


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("[drive]\nmode = \"caf\u00e9\"\n".encode("latin-1"))
    result = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 78
    assert f"{bad}: not UTF-8 text" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_exits_78_without_ready(tmp_path: Path, systemd: FakeSystemd) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[drive]\nrate_hz = -5\n")
    result = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(bad)], capture_output=True,
                            text=True, timeout=60, env={**os.environ})
    assert result.returncode == 78
    assert result.stderr.count(f"{bad}: drive.rate_hz: Input should be greater than 0") == 1
    time.sleep(0.2)
    assert systemd.first("READY=1") is None


def test_journald_format_under_systemd(tmp_path: Path) -> None:
    from tests.test_cli import start_twin

    twin, port = start_twin("--track", "generated_track")
    env = {**os.environ, "JOURNAL_STREAM": "8:12345"}
    try:
        result = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--sim", f"127.0.0.1:{port}", "--model",
                                 str(ROOT / "models" / "pilot.tflite"), "--duration", "1.5"],
                                capture_output=True, text=True, timeout=60, env=env)
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=20)
    assert result.returncode == 0, result.stderr
    log_lines = [line for line in result.stderr.splitlines() if line.startswith("<")]
    assert any(line.startswith("<6>donkey-agent: ready: local") for line in log_lines)
    assert any(line.startswith("<6>donkey-agent: stopped (duration of 1.5 s reached)") for line in log_lines)
    assert all(line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>") for line in log_lines)
    assert not any(line[3:5].isdigit() for line in log_lines)  # no timestamps: journald adds its own


def test_a_failing_optional_service_does_not_stop_driving(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from agent.run import contained

    async def broken() -> None:
        import sqlite3

        raise sqlite3.DatabaseError("database disk image is malformed")

    with caplog.at_level("ERROR", logger="donkey-agent"):
        asyncio.run(contained(broken(), "the fleet link"))  # returns instead of raising
    assert "the fleet link failed; driving continues without it" in caplog.text
