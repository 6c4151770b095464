"""The agent under a real systemd: a booted Debian root (systemd-nspawn), our unit, the twin on the host.

Start (Type=notify: `systemctl start` returns after READY), STATUS=, a watchdog restart of a
hung agent, and `systemctl stop` leaving the car in neutral, observed through the twin. Then the
same unit driving a PCA9685 (the real adafruit driver over an I2C bus emulated in a file): a
SIGKILLed agent and a stopped one both leave the registers at the calibrated neutral counts,
written by the unit's ExecStopPost `safe-stop`.
"""

from __future__ import annotations

import json
import shutil
import signal
import tarfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests import nspawn
from tests.fakes import extended_bus
from tests.fakes.extended_bus import LoggedWrite, read_channel, read_log
from tests.fakes.parts import wait_for
from tests.test_cli import start_twin

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(nspawn.available()), reason=nspawn.available() or "ok")]


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory):
    tarball = nspawn.ensure_root_tarball()
    wheels = nspawn.build_wheels()
    root = tmp_path_factory.mktemp("nspawn") / "root"
    root.mkdir()
    with tarfile.open(tarball) as archive:
        archive.extractall(root, filter="fully_trusted")
    box = nspawn.Container(root)
    box.install_agent(wheels)
    (root / "opt" / "donkey-agent" / "models").mkdir(parents=True)
    shutil.copy(nspawn.REPO / "models" / "pilot.tflite", root / "opt" / "donkey-agent" / "models" / "pilot.tflite")
    shutil.copy(nspawn.REPO / "systemd" / "donkey-agent.service", root / "etc" / "systemd" / "system")
    yield box
    box.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def test_start_watchdog_restart_and_safe_stop(container: nspawn.Container, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    twin, port = start_twin("--track", "generated_track", "--summary", str(summary))
    try:
        config = container.root / "etc" / "donkey-agent"
        config.mkdir(parents=True, exist_ok=True)
        (config / "agent.toml").write_text(
            f'[twin]\nport = {port}\n[autopilot]\nmodel = "/opt/donkey-agent/models/pilot.tflite"\n'
            "[drive]\nmax_throttle = 0.3\n")
        container.boot()
        start = container.run("systemctl", "start", "donkey-agent", check=False, timeout=120)
        journal = container.run("journalctl", "-u", "donkey-agent", "--no-pager", check=False).stdout
        assert start.returncode == 0, journal[-3000:]
        state = container.show("donkey-agent", "ActiveState", "SubState", "StatusText", "NRestarts", "MainPID")
        assert (state["ActiveState"], state["SubState"]) == ("active", "running")
        assert state["StatusText"].startswith(("local, ", "starting"))
        assert wait_for(lambda: "Hz" in container.show("donkey-agent", "StatusText")["StatusText"], 10, interval=0.3)
        time.sleep(3)  # drive a little

        # A hung agent (SIGSTOP: no thread runs, no watchdog ping) is killed and restarted by systemd.
        hung = state["MainPID"]
        container.run("kill", "-STOP", hung)
        assert wait_for(lambda: container.show("donkey-agent", "NRestarts")["NRestarts"] == "1", 20, interval=0.3)
        assert wait_for(lambda: container.show("donkey-agent", "ActiveState")["ActiveState"] == "active", 60,
                        interval=0.3)
        assert container.show("donkey-agent", "MainPID")["MainPID"] != hung
        journal = container.run("journalctl", "-u", "donkey-agent", "--no-pager").stdout
        assert "Watchdog timeout" in journal
        # It was driving when it hung: the restarted agent holds at neutral (drive.after_crash = "hold").
        assert wait_for(lambda: "unclean_exit" in container.show("donkey-agent", "StatusText")["StatusText"], 20,
                        interval=0.3)
        assert "ended without stopping while the car was driving" in container.run(
            "journalctl", "-u", "donkey-agent", "--no-pager").stdout

        # An e-stop (here from the machine itself: SIGUSR1) survives the next watchdog restart.
        container.run("systemctl", "kill", "-s", "USR1", "donkey-agent")
        assert wait_for(lambda: "estop" in container.show("donkey-agent", "StatusText")["StatusText"], 10,
                        interval=0.3)
        container.run("kill", "-STOP", container.show("donkey-agent", "MainPID")["MainPID"])
        assert wait_for(lambda: container.show("donkey-agent", "NRestarts")["NRestarts"] == "2", 20, interval=0.3)
        assert wait_for(lambda: "estop" in container.show("donkey-agent", "StatusText")["StatusText"], 60,
                        interval=0.3)
        journal = container.run("journalctl", "-u", "donkey-agent", "--no-pager").stdout
        assert "fault=estop, detail=latched before the restart: e-stop from signal" in journal
        shown = json.loads(container.run("/opt/donkey-agent/venv/bin/donkey-agent", "faults").stdout)
        assert {"estop", "unclean_exit"} <= set(shown["latched"])  # what a technician sees
        time.sleep(1)
        stop = container.run("systemctl", "stop", "donkey-agent", timeout=60)
        assert stop.returncode == 0
        assert container.show("donkey-agent", "ActiveState")["ActiveState"] == "inactive"
        journal = container.run("journalctl", "-u", "donkey-agent", "--no-pager").stdout
        assert "stopped (SIGTERM)" in journal
        assert "nothing to stop" in journal  # ExecStopPost safe-stop ran
        print(journal[-4000:])  # shown with pytest -s: what a technician sees in the journal
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=20)
    cars = json.loads(summary.read_text())["cars"]
    assert len(cars) == 3  # one car per agent start: before and after each watchdog restart
    assert cars[0]["distance_m"] > 0.5 and cars[0]["off_track_events"] == 0  # it drove
    for held in cars[1:]:  # held after the crash, then e-stopped: never moved
        assert held["distance_m"] < 0.05 and held["last_controls"] == [0.0, 0.0]


# -- safe-stop on an emulated PCA9685 ----------------------------------------------------------

FAKES = Path(__file__).parent / "fakes"
THROTTLE, STEERING = 0, 1  # the default channels
STOPPED, CENTRE = 370, 375  # the default calibration's stopped throttle and centred steering counts
NEUTRAL = [(THROTTLE, STOPPED), (STEERING, CENTRE)]  # and the order the driver writes them in
UNDER_WAY = STOPPED + 13  # 0.1 of the forward range (500 - 370): clearly driving, not a rounding step off neutral
SAFE_STOP_LINE = "safe-stop: PCA9685 0x40 channels 0 (throttle) and 1 (steering) at neutral"


@pytest.fixture(scope="module")
def emulated_pca9685(container: nspawn.Container) -> Path:
    """Install the fake ``adafruit_extended_bus`` in the agent's venv; the host path of its files.

    ``Pca9685Actuators.open`` imports ``adafruit_extended_bus.ExtendedI2C`` first, so the agent and
    safe-stop run the real adafruit_pca9685 driver (installed with the ``pi`` extra) over a
    register file in the unit's StateDirectory: writable as the unit is shipped (ProtectSystem=strict
    leaves the StateDirectory writable), so no drop-in is needed, and on the container's root file
    system, so the host reads it under ``container.root``. /dev/i2c-N and DeviceAllow= are not
    exercised: the emulation replaces the device node.
    """
    package = container.site_packages() / "adafruit_extended_bus"
    package.mkdir(exist_ok=True)
    shutil.copy(FAKES / "extended_bus.py", package / "__init__.py")
    shutil.copy(FAKES / "i2c.py", package / "i2c.py")
    return container.root / extended_bus.DIRECTORY.relative_to("/")


class Run(NamedTuple):
    """Consecutive PWM writes by one process."""

    pid: int
    command: str  # "run" (the agent) or "safe-stop"
    led: list[tuple[int, int]]  # (channel, OFF count), in order


def led_runs(writes: list[LoggedWrite]) -> list[Run]:
    """The logged PWM writes grouped by consecutive writer (MODE1 and PRESCALE writes left out)."""
    runs: list[Run] = []
    for write in writes:
        if not write.led():
            continue
        if not runs or runs[-1].pid != write.pid:
            runs.append(Run(write.pid, write.command, []))
        runs[-1].led.extend(write.led())
    return runs


def runs_after(runs: list[Run], pid: int) -> list[Run]:
    """The runs after ``pid``'s last one: everything written once that process had ended."""
    last = max(i for i, run in enumerate(runs) if run.pid == pid)
    return runs[last + 1:]


def throttle_count(registers: Path) -> int:
    return read_channel(registers, THROTTLE)[1]


def start_and_drive(container: nspawn.Container, registers: Path) -> int:
    """Start the unit, wait until the throttle register shows the car under way; the agent's PID.

    The twin is the camera only: the car in the twin stands still, and the pilot, seeing the
    start of the track, asks for throttle, which ramps up in the register within a few cycles.
    """
    start = container.run("systemctl", "start", "donkey-agent", check=False, timeout=120)
    journal = container.run("journalctl", "-u", "donkey-agent", "--no-pager", check=False).stdout
    assert start.returncode == 0, journal[-3000:]
    assert wait_for(lambda: throttle_count(registers) >= UNDER_WAY, 30, interval=0.05), journal[-3000:]
    return int(container.show("donkey-agent", "MainPID")["MainPID"])


def stop_and_check_neutral(container: nspawn.Container, registers: Path, agent: int) -> None:
    """`systemctl stop`: the agent's own last writes are neutral, then safe-stop's, and so are the registers."""
    assert container.run("systemctl", "stop", "donkey-agent", timeout=60).returncode == 0
    assert container.show("donkey-agent", "ActiveState")["ActiveState"] == "inactive"
    assert read_channel(registers, THROTTLE) == (0, STOPPED)
    assert read_channel(registers, STEERING) == (0, CENTRE)
    runs = led_runs(read_log(registers))
    own = [run for run in runs if run.pid == agent][-1]
    assert own.led[-2:] == NEUTRAL  # the core's own stop: throttle first
    assert [(run.command, run.led) for run in runs_after(runs, agent)] == [("safe-stop", NEUTRAL)]  # then only it


def test_safe_stop_leaves_an_emulated_pca9685_in_neutral(container: nspawn.Container, emulated_pca9685: Path) -> None:
    """SIGKILL while driving: the agent writes nothing more, ExecStopPost's safe-stop writes neutral."""
    registers = emulated_pca9685
    twin, port = start_twin("--track", "generated_track")
    try:
        if not container.pid1:
            container.boot()
        (container.root / "etc" / "donkey-agent").mkdir(parents=True, exist_ok=True)
        (container.root / "etc" / "donkey-agent" / "agent.toml").write_text(
            f'[twin]\nport = {port}\n[autopilot]\nmodel = "/opt/donkey-agent/models/pilot.tflite"\n'
            '[drive]\nmax_throttle = 0.3\n[actuators]\nbackend = "pca9685"\n')
        container.run("systemctl", "reset-failed", "donkey-agent", check=False)  # and the start rate limit
        # A fresh car and a powered-on chip: the earlier tests' runs (a watchdog kill while driving)
        # must not decide how this one starts; systemd recreates the StateDirectory at start.
        shutil.rmtree(registers, ignore_errors=True)
        since = container.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()

        # 1. `systemctl stop` while driving.
        agent = start_and_drive(container, registers)
        assert (registers / "fake-i2c-1.regs").read_bytes()[0xFE] == 101  # the real driver set 60 Hz
        stop_and_check_neutral(container, registers, agent)

        # 2. SIGKILL while driving: no neutral from the agent itself.
        killed = start_and_drive(container, registers)
        restarts = int(container.show("donkey-agent", "NRestarts")["NRestarts"])
        container.run("systemctl", "kill", "-s", "KILL", "donkey-agent")
        # Restart=on-failure: ExecStopPost, RestartSec=1, then a new agent (Type=notify: active once armed).
        assert wait_for(lambda: int(container.show("donkey-agent", "NRestarts")["NRestarts"]) == restarts + 1, 30,
                        interval=0.2)
        assert wait_for(lambda: container.show("donkey-agent", "ActiveState")["ActiveState"] == "active", 60,
                        interval=0.2)
        runs = led_runs(read_log(registers))
        last_throttle = [count for channel, count in [run for run in runs if run.pid == killed][-1].led
                         if channel == THROTTLE][-1]
        assert last_throttle > STOPPED  # it died driving and wrote no neutral of its own
        safe, restarted, *_ = runs_after(runs, killed)
        assert (safe.command, safe.led) == ("safe-stop", NEUTRAL)  # ExecStopPost, throttle first
        # The registers held neutral from safe-stop on: the next writer is the restarted agent, arming at neutral
        # (whether it then drives again or holds after the crash is its own policy, not safe-stop's).
        assert restarted.command == "run" and restarted.pid != killed and restarted.led[:2] == NEUTRAL
        journal = container.run("journalctl", "-u", "donkey-agent", "--since", since, "--no-pager").stdout
        assert "status=9/KILL" in journal
        assert journal.count(SAFE_STOP_LINE) == 2  # the stop in 1., and the kill

        # 3. Whatever the restarted agent does, `systemctl stop` leaves neutral again.
        stop_and_check_neutral(container, registers, restarted.pid)
    finally:
        container.run("systemctl", "stop", "donkey-agent", check=False, timeout=60)
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=20)


def test_units_verify_inside_the_root(container: nspawn.Container) -> None:
    """With the agent installed where the unit says, verify passes on the unit as shipped."""
    if not container.pid1:
        container.boot()
    result = container.run("systemd-analyze", "verify", "--man=no", "/etc/systemd/system/donkey-agent.service",
                           check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_bad_config_fails_once_with_one_clear_message(container: nspawn.Container) -> None:
    if not container.pid1:
        container.boot()
    config = container.root / "etc" / "donkey-agent" / "agent.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[drive]\nmax_throttle = 3\n")
    container.run("systemctl", "reset-failed", "donkey-agent", check=False)
    since = container.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    start = container.run("systemctl", "start", "donkey-agent", check=False, timeout=60)
    assert start.returncode != 0
    time.sleep(4)  # long enough for several restarts, if there were any
    state = container.show("donkey-agent", "ActiveState", "NRestarts", "ExecMainStatus")
    assert state["ActiveState"] == "failed" and state["ExecMainStatus"] == "78"
    assert state["NRestarts"] == "0"  # RestartPreventExitStatus=78: no restart loop
    journal = container.run("journalctl", "-u", "donkey-agent", "--since", since, "--no-pager").stdout
    message = "/etc/donkey-agent/agent.toml: drive.max_throttle: Input should be less than or equal to 1"
    assert journal.count(message) == 1
