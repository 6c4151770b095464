"""The fault monitor and the decide step, state by event with a fake clock (no threads, no hardware)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import DriveConfig
from agent.core.commands import ClearFault, CommandError, Record, SetBehavior, SetMaxThrottle, SetMode, SwapPilot
from agent.core.control import ThrottleRamp
from agent.core.decide import CycleInputs, Decider, Inference
from agent.core.faults import LATCHED, Fault
from agent.core.handoff import EventQueue
from agent.core.ratekeeper import RateKeeper
from agent.core.safety import FaultMonitor
from agent.core.stops import StopBoard, StopRequest

TRANSIENT = [f for f in Fault if f not in LATCHED]


def monitor(**kwargs: float) -> tuple[FaultMonitor, EventQueue]:
    events = EventQueue()
    return FaultMonitor(events, **kwargs), events


def kinds(events: EventQueue) -> list[tuple[str, dict]]:
    return [(e.kind, e.detail) for e in events.drain()]


# -- transient faults: inactive -> active -> recovering -> inactive -------------------------------------
@pytest.mark.parametrize("fault", TRANSIENT)
def test_transient_fault_lifecycle(fault: Fault) -> None:
    faults, events = monitor(clear_hold=0.3)
    faults.observe(fault, False, 0.0)  # inactive + absent: nothing
    assert faults.ok and kinds(events) == []
    faults.observe(fault, True, 1.0, "why")  # inactive + present: raised, one event
    assert not faults.ok and faults.active() == {fault.value: "why"}
    faults.observe(fault, True, 1.1, "again")  # active + present: no second event, detail kept
    assert kinds(events) == [("fault", {"fault": fault.value, "detail": "why", "latched": False})]
    faults.observe(fault, False, 1.2)  # active + absent: recovering, still active
    faults.observe(fault, False, 1.4)
    assert not faults.ok
    faults.observe(fault, True, 1.45)  # recovering + present: the hold starts again
    faults.observe(fault, False, 1.5)
    faults.observe(fault, False, 1.79)
    assert not faults.ok
    faults.observe(fault, False, 1.81)  # absent for the whole hold: cleared
    assert faults.ok and kinds(events) == [("fault_cleared", {"fault": fault.value, "by": "recovered"})]


@pytest.mark.parametrize("fault", TRANSIENT)
def test_transient_faults_refuse_a_manual_clear(fault: Fault) -> None:
    faults, _ = monitor()
    faults.observe(fault, True, 0.0)
    assert faults.clear(fault, received=5.0, now=5.0) == [f"{fault.value} clears by itself once its cause is gone"]
    assert not faults.ok


# -- latched faults ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", sorted(LATCHED - {Fault.ESTOP}))
def test_latched_fault_stays_until_cleared(fault: Fault) -> None:
    faults, events = monitor(clear_hold=0.0)
    faults.latch(fault, 0.0, "broken")
    faults.observe(fault, False, 10.0)  # absence never clears a latched fault
    assert faults.latched and faults.latched_faults() == {fault.value: "broken"}
    faults.latch(fault, 11.0, "again")  # latching again: no second event
    assert faults.clear(None, received=12.0, now=12.0, source="mqtt") == []
    assert faults.ok and not faults.latched
    assert kinds(events)[-1] == ("fault_cleared", {"fault": fault.value, "by": "mqtt"})
    assert faults.clear(fault, received=13.0, now=13.0) == []  # clearing what is not active: nothing to refuse


def test_restored_faults_are_latched_with_their_reason() -> None:
    faults, events = monitor()
    faults.restore(Fault.UNCLEAN_EXIT, "the previous run crashed", 100.0)
    faults.restore(Fault.ESTOP, "latched before the restart: e-stop from mqtt", 100.0)
    assert faults.latched_faults() == {"unclean_exit": "the previous run crashed",
                                       "estop": "latched before the restart: e-stop from mqtt"}
    assert faults.clear(Fault.ESTOP, received=100.5, now=100.5)  # the hold restarts at the restore
    assert faults.clear(Fault.ESTOP, received=101.0, now=101.0) == []
    assert [k for k, _ in kinds(events)].count("fault") == 2


# -- the e-stop: minimum hold, arrival order, held levels -----------------------------------------------
def request(at: float, source: str = "mqtt") -> StopRequest:
    return StopRequest(source, "test", at)


def test_estop_holds_for_its_minimum_time_counted_from_arrival() -> None:
    faults, events = monitor(estop_hold=1.0)
    faults.estop(request(10.0), now=10.02)
    assert faults.is_active(Fault.ESTOP)
    # A clear that arrived 47 ms after the e-stop (queued one cycle behind it) is refused...
    refused = faults.clear(Fault.ESTOP, received=10.047, now=10.05)
    assert refused and "holds for at least 1 s" in refused[0]
    # ...and so is one that arrived before it but was applied after (a reordering).
    assert faults.clear(None, received=9.9, now=10.1)
    assert faults.clear(Fault.ESTOP, received=11.0, now=11.0) == []
    assert faults.ok
    assert [k for k, _ in kinds(events)] == ["estop", "fault", "fault_cleared"]


def test_a_new_estop_restarts_the_hold() -> None:
    faults, _ = monitor(estop_hold=1.0)
    faults.estop(request(0.0), 0.0)
    faults.estop(request(0.8, "button"), 0.8)  # latched already: the hold now counts from 0.8
    assert faults.clear(Fault.ESTOP, received=1.5, now=1.5)
    assert faults.clear(Fault.ESTOP, received=1.8, now=1.8) == []


def test_no_clear_while_a_source_holds_its_level() -> None:
    faults, _ = monitor(estop_hold=0.0)
    faults.estop(request(0.0, "button"), 0.0)
    faults.estop(request(0.5, "mqtt"), 0.5)  # an MQTT e-stop does not release the button
    refused = faults.clear(None, received=5.0, now=5.0, held_by="button")
    assert refused == ["the e-stop is still held (button)"] and faults.is_active(Fault.ESTOP)
    assert faults.clear(None, received=6.0, now=6.0, held_by="") == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["estop", "clear", "hold", "release", "tick"]),
                          st.floats(min_value=0.0, max_value=0.7)), max_size=40))
def test_an_estop_is_never_cleared_early_or_while_held(steps: list[tuple[str, float]]) -> None:
    """Whatever the order of presses, clears, button levels and time: a clear succeeds only if it
    arrived at least the hold after the newest e-stop and no button was held."""
    faults, _ = monitor(estop_hold=1.0)
    board = StopBoard(clock=lambda: now)
    button = board.source("button")
    now, newest_estop = 0.0, -math.inf
    for action, dt in steps:
        now += dt
        if action == "estop":
            board.source("mqtt").press("fuzz", at=now)
        elif action == "hold":
            button.hold(True, "down")
        elif action == "release":
            button.hold(False)
        for stop in board.new_requests():
            faults.estop(stop, now)
            newest_estop = max(newest_estop, stop.at)
        if action == "clear":
            was_active = faults.is_active(Fault.ESTOP)
            refused = faults.clear(Fault.ESTOP, received=now, now=now, held_by=board.held_by())
            if was_active and not refused:
                assert now >= newest_estop + 1.0 and not button.held
        if button.held:
            assert faults.is_active(Fault.ESTOP)


# -- the decide step -----------------------------------------------------------------------------------
def decider(**drive: object) -> tuple[Decider, EventQueue]:
    events = EventQueue()
    config = DriveConfig(**drive)  # type: ignore[arg-type]
    faults = FaultMonitor(events, clear_hold=config.fault_clear_hold_ms / 1000, estop_hold=config.estop_hold_ms / 1000)
    return Decider(config, faults, events, can_record=True), events


class FakePilot:
    def __init__(self) -> None:
        self.resets = 0
        self.behavior = -1

    def reset(self) -> None:
        self.resets += 1

    def set_behavior(self, index: int) -> None:
        if index > 2:
            raise ValueError(f"behaviour {index} is outside 0..2")
        self.behavior = index


def fresh(now: float, inference: Inference | None = None) -> CycleInputs:
    return CycleInputs(now, 0.01, inference=inference)


def test_decide_drives_only_without_faults_and_ramps_throttle() -> None:
    decide, _ = decider(max_throttle=0.5, throttle_ramp_per_s=1.0, mode="local")
    decide.pilot = FakePilot()
    first = decide.decide(fresh(0.0, Inference(0.3, 0.9)))
    later = decide.decide(fresh(0.1, Inference(0.3, 0.9)))
    assert first.ok and first.steering == 0.3 and first.throttle == 0.0  # ramp starts from rest
    assert later.throttle == pytest.approx(0.1)
    stale = decide.decide(CycleInputs(0.2, 0.2))  # frame 200 ms old: neutral at once
    assert (stale.steering, stale.throttle, stale.ok) == (0.0, 0.0, False)


def test_decide_inference_failures_and_overruns() -> None:
    decide, _ = decider(overrun_limit=2, inference_budget_ms=10, mode="local")
    decide.pilot = FakePilot()
    assert not decide.decide(fresh(0.0, Inference(failure="non-finite"))).ok
    decide.decide(fresh(1.0, Inference(0.0, 0.1)))
    assert decide.faults.is_active(Fault.INFERENCE_ERROR)  # clears only after the hold
    assert decide.decide(fresh(1.4, Inference(0.0, 0.1))).ok
    decide.decide(fresh(1.5, Inference(0.0, 0.1, invoke_s=0.02)))
    assert decide.decide(fresh(1.55, Inference(0.0, 0.1, invoke_s=0.02))).ok is False  # a streak of 2


def test_commands_expire_and_the_latched_gate_is_in_the_core() -> None:
    decide, events = decider(max_throttle=0.4, mode="user")
    decide.pilot = FakePilot()
    late = SetMaxThrottle(value=0.2, received=0.0, expires=2.0)
    assert "expired" in decide.apply(late, 2.5).reason and decide.max_throttle == 0.4
    assert late.outcome is not None and not late.outcome.ok  # the requester sees the outcome on the command
    decide.accept_stops([StopRequest("mqtt", "stop", 3.0)], 3.0)
    assert "latched" in decide.apply(SetMode(mode="local", received=3.1), 3.1).reason
    assert "latched" in decide.apply(SetMaxThrottle(value=0.9, received=3.1), 3.1).reason
    assert decide.apply(SetMaxThrottle(value=0.1, received=3.1), 3.1).ok  # lowering is always allowed
    assert decide.apply(SetMode(mode="user", received=3.1), 3.1).ok  # so is manual mode
    assert not decide.apply(ClearFault(received=3.2), 3.2).ok  # inside the e-stop's hold
    assert decide.apply(ClearFault(received=4.1), 4.1).ok
    assert decide.apply(SetMode(mode="local", received=4.2), 4.2).ok and decide.mode == "local"
    assert decide.pilot.resets == 1  # a mode change forgets the pilot's state
    kinds_ = [e.kind for e in events.drain()]
    assert kinds_.count("command") == 8 and "mode" in kinds_


def test_record_behavior_and_a_stall() -> None:
    decide, _ = decider(mode="user")
    assert decide.apply(Record(on=False), 0.0).ok and not decide.recording
    assert decide.apply(SetBehavior(index=1), 0.0).reason == "no autopilot"
    decide.pilot = FakePilot()
    assert decide.apply(SetBehavior(index=5), 0.0).reason == "behaviour 5 is outside 0..2"
    decide.accept_stops([], 1.0, stall="missed 200 ms")
    assert decide.faults.latched_faults() == {"drive_stall": "missed 200 ms"}
    assert not decide.decide(fresh(1.0)).ok


def test_heartbeat_in_user_mode() -> None:
    decide, _ = decider(mode="user", heartbeat_timeout_ms=300, throttle_ramp_per_s=100)
    ok = decide.decide(CycleInputs(1.0, 0.01, manual=(0.2, 0.3, 0.9)))
    assert ok.ok and ok.steering == 0.2
    lost = decide.decide(CycleInputs(1.25, 0.01, manual=(0.2, 0.3, 0.9)))
    assert not lost.ok and decide.faults.is_active(Fault.HEARTBEAT_LOST)


# -- the ramp and the rate keeper, with a fake clock ----------------------------------------------------
def test_throttle_ramp_up_slowly_down_at_once_and_through_neutral() -> None:
    ramp = ThrottleRamp(2.0)
    ramp.reset(0.0)
    assert ramp.apply(1.0, 0.1) == pytest.approx(0.2)
    assert ramp.apply(1.0, 0.2) == pytest.approx(0.4)
    assert ramp.apply(0.1, 0.21) == 0.1  # down: at once
    assert ramp.apply(-1.0, 0.31) == pytest.approx(-0.2)  # reversing starts from neutral


def test_rate_keeper_keeps_absolute_deadlines_and_skips_missed_periods() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    keeper = RateKeeper(10.0, clock=lambda: now[0], sleep=sleep)
    keeper.wait()
    assert now[0] == pytest.approx(0.1)
    now[0] += 0.03  # work
    keeper.wait()
    assert now[0] == pytest.approx(0.2)  # no drift: the deadline is absolute
    now[0] += 0.35  # a long stall past the 0.3 and 0.4 ticks: those are skipped, not caught up
    assert keeper.wait() == pytest.approx(0.05)
    assert keeper.missed_periods == 2 and keeper.next_deadline == pytest.approx(0.6)


# -- swapping the model: only while the car is stopped ----------------------------------------------------------
class SwappablePilot(FakePilot):
    def prepare(self, image: object, imu: object = None) -> None: ...

    def invoke(self) -> None: ...

    def result(self) -> object: ...


def swap(decide: Decider, now: float, label: str) -> SwapPilot:
    command = SwapPilot(pilot=SwappablePilot(), label={"name": label})
    decide.apply(command, now)
    return command


def test_a_model_swap_waits_for_the_car_to_stop() -> None:
    decide, events = decider(mode="local", stopped_after_ms=1000, throttle_ramp_per_s=100.0)
    first = decide.pilot = SwappablePilot()
    decide.decide(fresh(0.0, Inference(0.0, 0.3)))  # the ramp starts from rest...
    assert decide.decide(fresh(0.04, Inference(0.0, 0.3))).throttle > 0  # ...and the car moves
    moving = swap(decide, 0.05, "v2")
    assert moving.outcome is not None and not moving.outcome.ok and "moving" in moving.outcome.reason
    assert decide.pilot is first and moving.replaced is None  # nothing changed
    decide.apply(SetMode(mode="user"), 0.1)  # the operator takes over and lets go: neutral throttle
    decide.decide(CycleInputs(0.1, 0.01, manual=(0.0, 0.0, 0.1)))
    coasting = swap(decide, 0.6, "v2")
    assert coasting.outcome is not None and not coasting.outcome.ok and "0.5 s of 1 s" in coasting.outcome.reason
    decide.decide(CycleInputs(1.1, 0.01, manual=(0.0, 0.0, 1.1)))
    stopped = swap(decide, 1.15, "v2")
    assert stopped.outcome is not None and stopped.outcome.ok
    assert stopped.replaced is first and decide.pilot is stopped.pilot and decide.pilot.resets == 1
    assert decide.model_label == {"name": "v2"}
    swapped = [detail for kind, detail in kinds(events) if kind == "model_swapped"]
    assert swapped == [{"from": {}, "to": {"name": "v2"}, "source": "local"}]


def test_a_fault_holding_the_car_in_neutral_counts_as_stopped() -> None:
    decide, _ = decider(mode="local", throttle_ramp_per_s=100.0)
    decide.pilot = SwappablePilot()
    decide.decide(fresh(0.0, Inference(0.0, 0.3)))
    assert decide.decide(fresh(0.005, Inference(0.0, 0.3))).throttle > 0
    decide.accept_stops([request(0.01)], 0.01)  # an e-stop: neutral, latched
    assert not decide.decide(fresh(0.02)).ok
    command = swap(decide, 0.03, "v3")
    assert command.outcome is not None and command.outcome.ok


def test_swap_pilot_refuses_something_that_is_not_an_autopilot() -> None:
    with pytest.raises(CommandError, match="lacks prepare, invoke, result"):
        SwapPilot(pilot=FakePilot())


# -- the attestation gate (agent/attest decides; the core holds the car to it) ----------------------------------
def gated(**drive: object) -> Decider:
    events = EventQueue()
    config = DriveConfig(mode="local", throttle_ramp_per_s=100.0, fault_clear_hold_ms=0, **drive)  # type: ignore[arg-type]
    faults = FaultMonitor(events, clear_hold=0.0, estop_hold=1.0)
    decide = Decider(config, faults, events, gated_modes=frozenset({"local", "local_angle"}))
    decide.pilot = FakePilot()
    return decide


def test_a_car_waits_in_neutral_for_its_first_token_without_latching() -> None:
    decide = gated()
    decision = decide.decide(fresh(0.0, Inference(0.1, 0.5)))
    assert not decision.ok and decide.faults.is_active(Fault.AWAITING_ATTESTATION)
    assert not decide.faults.latched  # booting is not a fault to clear by hand
    decide.clearance = (True, "pass", 100.0)
    decide.decide(fresh(0.1, Inference(0.1, 0.5)))  # the transient fault clears (hold 0 here)...
    assert decide.decide(fresh(0.2, Inference(0.1, 0.5))).ok  # ...and the car drives


@pytest.mark.parametrize("loss", [(False, "attestation revoked by the verifier", 100.0), (True, "pass", 5.0)])
def test_losing_attestation_while_driving_latches_neutral_and_only_user_mode_recovers(
        loss: tuple[bool, str, float]) -> None:
    decide = gated()
    decide.clearance = (True, "pass", 100.0)
    decide.decide(fresh(0.0, Inference(0.1, 0.5)))
    assert decide.decide(fresh(1.0, Inference(0.1, 0.5))).ok
    decide.clearance = loss  # revoked, or a pass token whose expiry (5.0 on the core's clock) passes
    decision = decide.decide(fresh(6.0, Inference(0.1, 0.5)))
    assert not decision.ok and decide.faults.is_active(Fault.ATTESTATION) and decide.faults.latched
    clear = ClearFault(fault="attestation")
    decide.apply(clear, 6.1)
    assert clear.outcome is not None and not clear.outcome.ok and "still not attested" in clear.outcome.reason
    local = SetMode(mode="local_angle")
    decide.apply(local, 6.1)
    assert local.outcome is not None and not local.outcome.ok and "latched" in local.outcome.reason
    user = SetMode(mode="user")  # manual driving stays possible...
    decide.apply(user, 6.2)
    assert user.outcome is not None and user.outcome.ok
    clear = ClearFault(fault="attestation")
    decide.apply(clear, 6.3)  # ...once the operator clears the latch in user mode
    assert clear.outcome is not None and clear.outcome.ok
    manual = decide.decide(CycleInputs(6.4, 0.01, manual=(0.2, 0.3, 6.4)))
    assert manual.ok and manual.throttle > 0
    back = SetMode(mode="local")
    decide.apply(back, 6.5)  # still no token: autonomy refused
    assert back.outcome is not None and not back.outcome.ok and "needs a valid attestation" in back.outcome.reason


def test_without_a_gate_nothing_changes() -> None:
    decide, _ = decider(mode="local", throttle_ramp_per_s=100.0)
    decide.pilot = FakePilot()
    decide.clearance = (False, "ignored", 0.0)  # no gated modes: the verdict is never consulted
    decide.decide(fresh(0.0, Inference(0.1, 0.5)))
    assert decide.decide(fresh(0.1, Inference(0.1, 0.5))).ok
