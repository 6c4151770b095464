"""The agent under a real systemd: a booted Debian root (systemd-nspawn), our unit, the twin on the host.

Start (Type=notify: `systemctl start` returns after READY), STATUS=, a watchdog restart of a
hung agent, and `systemctl stop` leaving the car in neutral, observed through the twin.
"""

from __future__ import annotations

import json
import shutil
import signal
import tarfile
import time
from pathlib import Path

import pytest

from tests import nspawn
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
        time.sleep(3)

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
    assert len(cars) >= 2  # one car per agent start: before and after the watchdog restart
    last = cars[-1]
    assert last["distance_m"] > 0.5 and last["off_track_events"] == 0
    assert last["last_controls"] == [0.0, 0.0]  # the stopped agent left the car in neutral


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
