"""The real agent (`donkey-agent run`, the shipped model) drives a simulator that turns hostile.

For each bad input the simulator sends while the car drives (tests/hostile_sim.py: a real TCP server speaking
the Donkey protocol with real camera frames), checked on the simulator's side of the socket, never from the
agent's log: the agent does not crash; neutral reaches the simulator within one control period of the fault
(the newest good frame going stale); while faulted it sends at most one control per period; and it drives
again when good data returns, reconnecting as a new car where the link was lost.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile_sim import HostileSim

ROOT = Path(__file__).parent.parent
PERIOD = 0.05
MAX_AGE = 0.150
SLACK = 0.04  # scheduling on a loaded 2-core machine
pytestmark = pytest.mark.slow


class Agent:
    def __init__(self, sim: HostileSim, tmp: Path) -> None:
        config = tmp / "agent.toml"
        config.write_text(f"[drive.realtime]\npriority = 0\n[state]\ndirectory = \"{tmp / 'state'}\"\n")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim", f"127.0.0.1:{sim.port}",
             "--model", str(ROOT / "models" / "pilot.tflite"), "--max-throttle", "0.3"],
            stderr=subprocess.PIPE, text=True)

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        _, log = self.process.communicate(timeout=30)
        return log


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileSim, Agent]]:
    sim = HostileSim().start()
    agent = Agent(sim, tmp_path_factory.mktemp("hostile"))
    try:
        yield sim, agent
    finally:
        log = agent.stop()
        sim.stop()
        assert agent.process.returncode == 0, log[-3000:]
        assert "Traceback" not in log


def driving(sim: HostileSim, since: float) -> bool:
    return any(c.throttle > 0.05 for c in sim.controls_since(since))


def wait_driving(sim: HostileSim, timeout: float = 30.0) -> None:
    assert sim.wait_for(lambda: driving(sim, time.monotonic() - 0.3), timeout), "the car is not driving"


def moved_on_stale_data(sim: HostileSim, controls: list) -> list[tuple[float, float | None]]:
    """Controls that moved the car with no good frame rendered within a frame age plus a period before them:
    the agent's own frame timestamps (arrival) cannot see a backlog in its socket; the simulator's clock can."""
    bad = []
    for control in controls:
        if control.throttle != 0.0:
            newest = sim.newest_good_frame(control.received)
            if newest is None or control.received - newest > MAX_AGE + PERIOD + SLACK:
                bad.append((control.received, newest))
    return bad


@pytest.mark.parametrize("kind", ["nested", "wrong_types", "no_image", "huge", "bomb", "big_image", "silence"])
def test_bad_simulator_data_means_neutral_on_the_wire_and_recovery(rig: tuple[HostileSim, Agent], kind: str) -> None:
    """Every tick's frame is replaced by something bad: no usable frame until it ends."""
    sim, agent = rig
    wait_driving(sim)
    sim.misbehave(kind, seconds=1.5)  # (a bomb PNG is made before it starts: that can take a while)
    start = time.monotonic()  # the newest good frame was rendered at or before this
    assert sim.wait_idle(10)
    ended = time.monotonic()
    window = sim.controls_since(start)
    assert agent.process.poll() is None, "the agent died"
    neutral = next((c for c in window if c.throttle == 0.0 and c.steering == 0.0), None)
    assert neutral is not None, f"{kind}: no neutral reached the simulator"
    late = neutral.received - start
    assert late <= MAX_AGE + PERIOD + SLACK, f"{kind}: neutral after {late:.3f} s"
    after = [c for c in window if neutral.received < c.received <= ended]
    assert all(c.throttle == 0.0 for c in after), f"{kind}: moved while faulted"
    span = ended - neutral.received
    assert len(after) <= span / PERIOD + 2, f"{kind}: {len(after)} controls in {span:.2f} s"  # no spin
    assert sim.wait_for(lambda: driving(sim, ended), 5), f"{kind}: did not drive again"
    assert moved_on_stale_data(sim, sim.controls_since(start)) == []


@pytest.mark.parametrize("kind", ["cutoff", "random"])
def test_garbage_before_good_frames_never_moves_the_car_on_stale_data(rig: tuple[HostileSim, Agent],
                                                                     kind: str) -> None:
    """Garbage (a cut-off message, 1 MB of random bytes) before every good frame, 20 times a second: the
    agent resynchronises on each good frame and may drive on it, but only while it is fresh, measured on the
    simulator's clock; when parsing the flood makes frames late, it must be in neutral."""
    sim, agent = rig
    wait_driving(sim)
    start = time.monotonic()
    sim.misbehave(kind, seconds=1.5)
    assert sim.wait_idle(10)
    ended = time.monotonic()
    assert agent.process.poll() is None, "the agent died"
    window = sim.controls_since(start)
    assert len(window) <= (ended - start) / PERIOD + 3  # no burst of controls either
    assert sim.wait_for(lambda: driving(sim, ended), 5), f"{kind}: did not drive again"
    assert moved_on_stale_data(sim, sim.controls_since(start)) == []


@pytest.mark.parametrize("action", ["close", "restart"])
def test_a_lost_link_reconnects_as_a_new_car_that_starts_in_neutral(rig: tuple[HostileSim, Agent],
                                                                   action: str) -> None:
    sim, agent = rig
    wait_driving(sim)
    cars = sim.cars()
    lost = time.monotonic()
    sim.misbehave(action, seconds=2.0)
    assert sim.wait_idle(10)
    assert sim.wait_for(lambda: sim.cars() > cars, 15), f"{action}: the agent did not reconnect"
    new_car = max(c.number for c in sim.connections)
    assert sim.wait_for(lambda: driving(sim, lost), 10), f"{action}: did not drive again"
    first = sim.controls_since(lost, car=new_car)
    assert first and first[0].throttle == 0.0  # fresh frames must flow for the hold time before it moves
    moving = next(c for c in first if c.throttle > 0.05)
    assert moving.received - first[0].received >= 0.2
    assert agent.process.poll() is None
