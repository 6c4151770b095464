"""The drive core driving the in-process twin, with each safety trigger injected while driving."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from agent.config import DriveConfig, RealtimeConfig
from agent.core import drive
from agent.core.commands import ClearFault, SetMode, SwapPilot
from agent.core.drive import DriveCore, DriveParts
from agent.core.handoff import Clearance
from agent.core.metrics import INDEX
from agent.core.shadow import ShadowTap
from agent.pilot import Autopilot
from tests.fakes.parts import TwinRig, wait_for

MODELS = Path(__file__).parent / "fixtures" / "models"
SHIPPED = Path(__file__).parent.parent / "models" / "pilot.tflite"
PERIOD = 0.05
NO_RT = RealtimeConfig(priority=0, lock_memory=False)


def make_core(rig: TwinRig, model: Path | None = SHIPPED, **drive: object) -> DriveCore:
    config = DriveConfig(realtime=NO_RT, **drive)  # type: ignore[arg-type]
    make_pilot = (lambda: Autopilot(model)) if model else None
    core = DriveCore(config, DriveParts(rig, rig, make_pilot))
    core.start()
    assert core.wait_ready(20), core.error
    return core


@pytest.fixture
def rig():
    rig = TwinRig()
    yield rig
    rig.close()


def event_kinds(core: DriveCore) -> list[tuple[str, dict]]:
    return [(e.kind, e.detail) for e in core.events.drain()]


def moving(rig: TwinRig, since: float) -> bool:
    return any(abs(t) > 0.01 for _, _, t in rig.writes_after(since))


def test_drives_the_twin_with_the_shipped_model(rig: TwinRig) -> None:
    core = make_core(rig, max_throttle=0.5)
    try:
        assert rig.writes[0][1:] == (0.0, 0.0)  # armed at neutral before anything else
        time.sleep(3.0)
        assert core.ok, core.status()["faults"]
        assert rig.car.stats.off_track_events == 0
        assert rig.car.stats.distance > 2.0  # it is moving, and steering along the road
        status = core.status()
        assert 15 < status["rate_hz"] < 25
        assert status["frames_missed"] <= 3
    finally:
        core.stop()
    assert rig.writes[-1][1:] == (0.0, 0.0)  # left at neutral
    kinds = [k for k, _ in event_kinds(core)]
    assert kinds[:2] == ["realtime", "started"] and kinds[-1] == "stopped"


def test_a_frame_is_never_used_for_two_decisions(rig: TwinRig) -> None:
    core = make_core(rig, pacing="timer", rate_hz=40.0)  # ticks twice per frame
    try:
        time.sleep(1.5)
    finally:
        core.stop()
    rows = core.metrics.recent()
    decided = rows[rows[:, INDEX["decided"]] == 1.0, INDEX["frame_seq"]]
    assert core.metrics.frames_missed > 10  # half the ticks find no new frame...
    assert len(decided) > 20
    assert len(set(decided.tolist())) == len(decided)  # ...and no frame is decided on twice


def test_stale_frames_put_the_car_in_neutral_within_a_period(rig: TwinRig) -> None:
    core = make_core(rig, max_frame_age_ms=150)
    try:
        assert wait_for(lambda: moving(rig, 0.0))
        rig.pause_frames.set()
        paused = time.monotonic()
        assert wait_for(lambda: "stale_frame" in core.status()["faults"], timeout=2)
        last_frame = rig.slot.latest.timestamp
        assert wait_for(lambda: rig.first_neutral_after(paused) is not None, timeout=1)
        neutral = rig.first_neutral_after(paused)
        assert neutral is not None
        assert neutral - (last_frame + 0.150) <= PERIOD + 0.02  # within one period of going stale
        assert all(t == 0.0 for _, _, t in rig.writes_after(neutral))
        rig.pause_frames.clear()  # transient: recovers by itself
        assert wait_for(lambda: core.ok, timeout=3)
        recovered = time.monotonic()
        assert wait_for(lambda: moving(rig, recovered), timeout=3)
    finally:
        core.stop()
    faults = [d for k, d in event_kinds(core) if k in ("fault", "fault_cleared")]
    assert faults[0]["fault"] == "stale_frame" and faults[0]["latched"] is False
    assert faults[1] == {"fault": "stale_frame", "by": "recovered"}


def test_nan_from_the_model_means_neutral(rig: TwinRig) -> None:
    core = make_core(rig, model=MODELS / "nan.tflite")
    try:
        assert wait_for(lambda: moving(rig, 0.0))
        rig.corrupt_pixel = True
        corrupted = time.monotonic()
        assert wait_for(lambda: "inference_error" in core.status()["faults"], timeout=2)
        first_neutral = rig.first_neutral_after(corrupted)
        assert first_neutral is not None and first_neutral - corrupted <= 2 * PERIOD + 0.02
        rig.corrupt_pixel = False
        assert wait_for(lambda: core.ok, timeout=3)
    finally:
        core.stop()
    faults = [d for k, d in event_kinds(core) if k == "fault"]
    assert "non-finite" in faults[0]["detail"]


def test_inference_overrun_streak_means_neutral(rig: TwinRig) -> None:
    core = make_core(rig, inference_budget_ms=0.001, overrun_limit=3)  # every invoke is "too slow"
    try:
        assert wait_for(lambda: "inference_overrun" in core.status()["faults"], timeout=3)
        raised = time.monotonic()
        time.sleep(0.5)
        assert "inference_overrun" in core.status()["faults"]  # the streak goes on, so does the fault
        later = rig.writes_after(raised + PERIOD)
        assert len(later) >= 5 and all(t == 0.0 and s == 0.0 for _, s, t in later)
    finally:
        core.stop()


def test_actuator_error_retries_once_then_latches_neutral(rig: TwinRig) -> None:
    core = make_core(rig)
    try:
        assert wait_for(lambda: moving(rig, 0.0))
        rig.fail_writes = 1  # one error: the retry succeeds, no fault
        time.sleep(0.3)
        assert core.ok
        rig.fail_writes = 2  # two in a row: neutral and a latched fault
        injected = time.monotonic()
        assert wait_for(lambda: "actuator_failure" in core.status()["faults"], timeout=2)
        assert rig.first_neutral_after(injected) is not None
        time.sleep(0.5)
        assert "actuator_failure" in core.status()["faults"]  # latched: still there
        assert not moving(rig, time.monotonic() - 0.3)
        assert core.submit(ClearFault(fault="actuator_failure", id="c1")) == ""
        assert wait_for(lambda: core.ok, timeout=2)
        recovered = time.monotonic()
        assert wait_for(lambda: moving(rig, recovered), timeout=3)
    finally:
        core.stop()
    events = event_kinds(core)
    assert ("fault_cleared", {"fault": "actuator_failure", "by": "local"}) in events
    assert ("command", {"name": "clear_fault", "id": "c1", "source": "local", "ok": True, "reason": ""}) in events


def test_estop_command_stops_at_the_next_cycle_and_latches(rig: TwinRig) -> None:
    core = make_core(rig)
    try:
        assert wait_for(lambda: moving(rig, 0.0))
        cycles = core.metrics.cycles
        core.stops.source("mqtt").press("test")
        assert wait_for(lambda: core.metrics.cycles > cycles + 1)
        index = core.metrics.cycles  # every cycle after the one that applied it is neutral
        assert wait_for(lambda: core.metrics.cycles > index + 5)
        rows = core.metrics.recent(5)
        assert (rows[:, INDEX["steering"]] == 0).all() and (rows[:, INDEX["throttle"]] == 0).all()
        assert "estop" in core.status()["faults"]
        time.sleep(1.0)  # an e-stop holds for estop_hold_ms before a clear counts
        core.submit(ClearFault())
        assert wait_for(lambda: core.ok)
    finally:
        core.stop()
    faults = [d for k, d in event_kinds(core) if k == "fault"]
    assert faults[0]["fault"] == "estop" and faults[0]["latched"] is True


def test_estop_button_cannot_be_cleared_while_held(rig: TwinRig) -> None:
    core = make_core(rig)
    try:
        button = core.stops.source("button")
        button.hold(True, "pressed")
        assert wait_for(lambda: "estop" in core.status()["faults"])
        time.sleep(1.1)  # past the minimum hold: only the button keeps it now
        core.submit(ClearFault(fault="estop", id="x"))
        assert wait_for(lambda: any(k == "command" and d["id"] == "x" and not d["ok"] for k, d in event_kinds(core)))
        assert "estop" in core.status()["faults"]
        button.hold(False)  # released: still latched
        core.submit(ClearFault(fault="estop"))
        assert wait_for(lambda: core.ok)
    finally:
        core.stop()


def test_manual_heartbeat_loss_in_user_mode(rig: TwinRig) -> None:
    core = make_core(rig, model=None, mode="user", heartbeat_timeout_ms=300, throttle_ramp_per_s=10)
    try:
        for _ in range(20):  # an operator holding throttle
            core.manual.set(0.1, 0.3)
            time.sleep(0.05)
        assert core.ok and moving(rig, time.monotonic() - 0.3)
        last = core.manual.latest[2]  # then the operator's link dies
        assert wait_for(lambda: "heartbeat_lost" in core.status()["faults"], timeout=2)
        time.sleep(0.1)
        neutral = rig.first_neutral_after(last)
        assert neutral is not None and 0 <= neutral - (last + 0.3) <= PERIOD + 0.03
    finally:
        core.stop()


def test_modes_multiplier_max_throttle_and_ramp(rig: TwinRig) -> None:
    core = make_core(rig, model=None, mode="user", max_throttle=0.4, throttle_ramp_per_s=0.5)
    try:
        start = time.monotonic()
        while time.monotonic() - start < 0.6:
            core.manual.set(-2.0, 0.9)
            time.sleep(0.02)
        throttles = [t for _, _, t in rig.writes_after(start)]
        steering = [s for _, s, _ in rig.writes_after(start)]
        assert max(throttles) <= 0.4 and min(steering) >= -1.0
        assert 0.1 < throttles[-1] < 0.4  # ramping at 0.5/s for ~0.6 s: on its way, not there
        increments = [b - a for a, b in itertools.pairwise(throttles)]
        assert max(increments) <= 0.5 * 0.1  # never a jump
        core.submit(SetMode(mode="local", id="m"))
        assert wait_for(lambda: any(k == "command" and d["id"] == "m" for k, d in event_kinds(core)))
        assert core.status()["mode"] == "user"  # refused: no model
    finally:
        core.stop()


def test_throttle_multiplier_scales_the_models_throttle(rig: TwinRig) -> None:
    core = make_core(rig, throttle_multiplier=0.5, throttle_ramp_per_s=100)
    try:
        time.sleep(1.0)
        rows = core.metrics.recent(10)
        pilot = Autopilot(SHIPPED).run(rig.car.render())
        assert 0 < rows[-1, INDEX["throttle"]] <= 0.5 * pilot.throttle + 0.05
    finally:
        core.stop()


def test_start_fails_cleanly_without_frames(rig: TwinRig) -> None:
    rig.pause_frames.set()
    time.sleep(0.1)
    rig.slot.latest = None
    core = DriveCore(DriveConfig(realtime=NO_RT, mode="user"), DriveParts(rig, rig, None))

    original = drive.FIRST_FRAME_TIMEOUT
    drive.FIRST_FRAME_TIMEOUT = 0.5
    try:
        core.start()
        assert not core.wait_ready(3)
        assert "no camera frame" in str(core.error)
        assert rig.writes[-1][1:] == (0.0, 0.0)
    finally:
        drive.FIRST_FRAME_TIMEOUT = original
        core.stop()


def rss_mb() -> float:
    with Path("/proc/self/statm").open() as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_memory_does_not_grow_with_gc_frozen() -> None:
    """GC is off in the hot path (frozen, young collections in the slack): memory must stay flat."""
    import gc

    rig = TwinRig(fps=50)
    core = make_core(rig, rate_hz=50, max_throttle=0.3)
    try:
        time.sleep(2.0)  # warm-up: caches, interpreter buffers, the metrics ring
        assert not gc.isenabled()  # frozen and disabled by the core
        before_rss, before_objects, cycles = rss_mb(), len(gc.get_objects()), core.metrics.cycles
        time.sleep(8.0)
        grown_rss, grown_objects = rss_mb() - before_rss, len(gc.get_objects()) - before_objects
        ran = core.metrics.cycles - cycles
    finally:
        core.stop()
        rig.close()
    assert gc.isenabled()  # released on stop
    assert ran > 300
    assert grown_rss < 4.0, f"RSS grew {grown_rss:.1f} MB over {ran} cycles"
    assert grown_objects < 3 * ran / 10, f"{grown_objects} more GC-tracked objects after {ran} cycles"


def test_a_model_swap_is_refused_while_driving_and_applied_between_cycles_once_stopped(rig: TwinRig) -> None:
    """The new interpreter is loaded and warmed here (off the drive thread) and handed over by reference; the
    core refuses it while the car moves, applies it once stopped, and its loop misses no deadline either way."""
    core = make_core(rig, max_throttle=0.5, stopped_after_ms=300)
    tap = ShadowTap()
    try:
        time.sleep(1.0)
        assert moving(rig, time.monotonic() - 0.5)
        candidate = Autopilot(MODELS / "linear.tflite")
        candidate.run(rig.car.render())  # warmed off the drive thread
        refused = SwapPilot(pilot=candidate, label={"name": "linear", "version": "2"})
        assert core.submit(refused) == ""
        assert wait_for(lambda: refused.outcome is not None, 2)
        assert refused.outcome is not None and not refused.outcome.ok and "moving" in refused.outcome.reason
        assert core.status()["model"] == {"path": str(SHIPPED), "kind": "linear"}

        core.shadow = tap  # meanwhile, a shadow trial would see every decided frame
        offered = tap.offered
        time.sleep(0.3)
        assert tap.offered - offered >= 4 and tap.latest is not None
        core.shadow = None

        assert core.submit(SetMode(mode="user")) == ""  # the operator stops the car (no manual input: neutral)
        time.sleep(0.5)
        accepted = SwapPilot(pilot=candidate, label={"name": "linear", "version": "2"})
        assert core.submit(accepted) == ""
        assert wait_for(lambda: accepted.outcome is not None, 2)
        assert accepted.outcome is not None and accepted.outcome.ok, accepted.outcome
        assert isinstance(accepted.replaced, Autopilot) and accepted.replaced.path == SHIPPED
        assert core.pilot is candidate and core.status()["model"] == {"name": "linear", "version": "2"}
        assert core.submit(SetMode(mode="local")) == ""
        time.sleep(0.5)
    finally:
        core.stop()
        tap.close()
    assert core.metrics.deadline_misses == 0
    swapped = [d for k, d in event_kinds(core) if k == "model_swapped"]
    assert swapped == [{"from": {"path": str(SHIPPED), "kind": "linear"}, "to": {"name": "linear", "version": "2"},
                        "source": "local"}]


def test_a_revoked_attestation_stops_the_car_within_a_period_and_latches(rig: TwinRig) -> None:
    clearance = Clearance()
    config = DriveConfig(realtime=NO_RT, max_throttle=0.5)
    core = DriveCore(config, DriveParts(rig, rig, lambda: Autopilot(SHIPPED)), clearance=clearance)
    core.start()
    try:
        assert core.wait_ready(20), core.error
        time.sleep(0.5)
        assert not moving(rig, time.monotonic() - 0.4)  # no token yet: it waits in neutral
        assert "awaiting_attestation" in core.status()["faults"]
        clearance.set(True, "pass", time.monotonic() + 60)
        assert wait_for(lambda: moving(rig, time.monotonic() - 0.1), 3)
        revoked = time.monotonic()
        clearance.set(False, "attestation revoked by the verifier", 0.0)
        assert wait_for(lambda: core.snapshot.latched == ("attestation",), 1)
        time.sleep(0.2)
        late = [w for w in rig.writes_after(revoked + PERIOD + 0.01) if w[2] != 0.0]
        assert late == []  # neutral on the wire from the next cycle on
        assert core.snapshot.faults["attestation"] == "attestation revoked by the verifier"
    finally:
        core.stop()
