"""The drive core under faults and hostile inputs at its own boundary: no spin, no crash, neutral on the wire.

The camera and actuators are the in-process twin (TwinRig): every write the core makes is recorded with
its time, so these tests check what reached the "wheels", not what the core says about itself.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.config import DriveConfig, RealtimeConfig
from agent.core.commands import ClearFault, SetMaxThrottle, SetMode
from agent.core.drive import DriveCore, DriveParts
from agent.hw.interfaces import Frame
from agent.pilot import Autopilot
from tests.fakes.parts import TwinRig, wait_for

SHIPPED = Path(__file__).parent.parent / "models" / "pilot.tflite"
PERIOD = 0.05
NO_RT = RealtimeConfig(priority=0, lock_memory=False)


def make_core(camera, actuators, **drive: object) -> DriveCore:
    config = DriveConfig(realtime=NO_RT, **drive)  # type: ignore[arg-type]
    core = DriveCore(config, DriveParts(camera, actuators, lambda: Autopilot(SHIPPED)))
    core.start()
    assert core.wait_ready(20), core.error
    return core


def thread_cpu_s(core: DriveCore) -> float:
    """CPU seconds of the drive thread, from the kernel (utime + stime in clock ticks)."""
    import os

    tid = core._thread.native_id
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BrokenCamera:
    """Frames from a rig until ``mode`` says otherwise: "closed" returns None at once (a dead link),
    "raise" raises (a backend bug, bad data), "noimage" returns a frame without an image."""

    def __init__(self, rig: TwinRig) -> None:
        self.rig = rig
        self.mode = ""
        self.reads = 0

    def read(self, after_seq: int, timeout: float) -> Frame | None:
        self.reads += 1
        if self.mode == "closed":
            return None
        if self.mode == "raise":
            raise ValueError("could not convert string to float: 'abc'")
        frame = self.rig.read(after_seq, timeout)
        if frame is not None and self.mode == "noimage":
            return Frame(frame.seq, frame.timestamp, None)  # type: ignore[arg-type]
        return frame

    def close(self) -> None:
        pass


@pytest.fixture
def rig():
    rig = TwinRig()
    yield rig
    rig.close()


@pytest.mark.parametrize("mode", ["closed", "raise", "noimage"])
def test_a_broken_camera_means_neutral_without_spinning(rig: TwinRig, mode: str) -> None:
    camera = BrokenCamera(rig)
    core = make_core(camera, rig, max_throttle=0.5)
    try:
        assert wait_for(lambda: any(t > 0.05 for _, _, t in rig.writes_after(0.0)), timeout=5)
        camera.mode = mode
        broken = time.monotonic()
        cpu_before, writes_before = thread_cpu_s(core), len(rig.writes)
        time.sleep(2.0)
        cpu = thread_cpu_s(core) - cpu_before
        writes = rig.writes[writes_before:]
        faults = core.status()["faults"]
    finally:
        core.stop()
    assert core.error is None and core.stopped.is_set()  # the thread survived
    assert faults, "a fault must be active"
    neutral = rig.first_neutral_after(broken)
    assert neutral is not None and neutral - broken <= 0.150 + PERIOD + 0.03  # stale, then neutral at once
    assert all(t == 0.0 for w, _, t in writes if w > neutral)
    assert len(writes) <= 2.0 / PERIOD + 3  # at most one control per period
    assert cpu < 0.1, f"the drive thread used {cpu:.2f} s of CPU in 2 s while faulted"  # no spin (< 5 %)


def test_camera_errors_are_a_transient_fault_that_recovers(rig: TwinRig) -> None:
    camera = BrokenCamera(rig)
    core = make_core(camera, rig)
    try:
        camera.mode = "raise"
        assert wait_for(lambda: "camera_error" in core.status()["faults"], timeout=3)
        camera.mode = ""
        assert wait_for(lambda: core.ok, timeout=3)
        recovered = time.monotonic()
        assert wait_for(lambda: any(t > 0.05 for _, _, t in rig.writes_after(recovered)), timeout=3)
    finally:
        core.stop()


def test_the_deadman_writes_neutral_when_the_drive_thread_hangs(rig: TwinRig) -> None:
    core = make_core(rig, rig, deadman_periods=3)
    try:
        assert wait_for(lambda: any(t > 0.05 for _, _, t in rig.writes_after(0.0)), timeout=5)
        rig.hang.set()  # the next write blocks: the drive thread is stuck inside the actuators
        hung = time.monotonic()
        assert wait_for(lambda: rig.neutral_calls >= 2, timeout=2)  # arm, then the dead-man's neutral
        neutral = rig.first_neutral_after(hung)
        # the next frame (a period), the limit (3 periods), the monitor's half-period poll
        assert neutral is not None and neutral - hung <= 4.5 * PERIOD + 0.05
        events = [e.kind for e in core.deadman.events.drain()]
        assert events == ["deadman"]
        rig.hang.clear()  # the stuck write completes; the core latches the stall and stays neutral
        assert wait_for(lambda: "drive_stall" in core.status()["latched"], timeout=2)
        released = time.monotonic()
        time.sleep(0.3)
        assert all(t == 0.0 for _, _, t in rig.writes_after(released + PERIOD))
        assert core.submit(ClearFault(fault="drive_stall")) == ""
        assert wait_for(lambda: core.ok, timeout=2)
    finally:
        core.stop()


def test_status_snapshots_are_safe_to_read_from_many_threads_while_faults_change(rig: TwinRig) -> None:
    camera = BrokenCamera(rig)
    core = make_core(camera, rig, fault_clear_hold_ms=0, estop_hold_ms=0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                status = core.status()
                assert isinstance(status["faults"], list)
                for _ in core.snapshot.faults.items():
                    pass
                _ = core.latched, core.ok, core.health(core.clock())
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    try:
        source = core.stops.source("stress")
        deadline = time.monotonic() + 3.0
        flips = 0
        while time.monotonic() < deadline:  # faults come and go as fast as the core cycles
            camera.mode = "raise" if flips % 2 else ""
            source.press("stress")
            time.sleep(0.01)
            core.submit(ClearFault())
            flips += 1
    finally:
        stop.set()
        for thread in readers:
            thread.join(5)
        core.stop()
    assert errors == []
    assert core.error is None


def test_commands_are_answered_in_order_and_never_dropped_silently(rig: TwinRig) -> None:
    core = make_core(rig, rig)
    try:
        commands = [SetMaxThrottle(value=0.1 + i / 1000) for i in range(200)]
        refusals = [core.submit(c) for c in commands]
        accepted = [c for c, r in zip(commands, refusals, strict=True) if not r]
        assert len(accepted) == 64 and all("full" in r for r in refusals[64:])  # refused and said so
        assert wait_for(lambda: all(c.outcome is not None for c in accepted), timeout=3)
        assert wait_for(lambda: core.status()["max_throttle"] == accepted[-1].value, timeout=1)
        stale = SetMode(mode="user", expires=time.monotonic() - 1)
        core.submit(stale)
        assert wait_for(lambda: stale.outcome is not None, timeout=2)
        assert stale.outcome is not None and "expired" in stale.outcome.reason
        assert core.status()["mode"] == "local"
    finally:
        core.stop()


def test_an_estop_pressed_behind_a_full_lane_still_stops(rig: TwinRig) -> None:
    core = make_core(rig, rig)
    try:
        assert wait_for(lambda: any(t > 0.05 for _, _, t in rig.writes_after(0.0)), timeout=5)
        while not core.submit(SetMaxThrottle(value=0.5)):
            pass  # fill the lane
        pressed = time.monotonic()
        core.stops.source("mqtt").press("behind a full lane")
        core.submit(ClearFault())  # refused: the lane is full; and it would be inside the hold anyway
        assert wait_for(lambda: "estop" in core.status()["faults"], timeout=1)
        neutral = rig.first_neutral_after(pressed)
        assert neutral is not None and neutral - pressed <= 2 * PERIOD + 0.02
    finally:
        core.stop()
