"""The decide step of a drive cycle: inputs and time in, the actuator command out.

The drive thread reads its inputs (frame, stop requests, commands, the model's output), hands
them to the ``Decider`` with the current time, and writes what comes back. Nothing here reads a
clock, a device or another thread, so every rule of the core (faults, e-stop hold, the
latched-fault gate, command expiry, modes, limits, the ramp) is tested with a fake clock
(tests/test_decide.py), as openpilot tests its state machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import DriveConfig
from agent.core.commands import (
    ClearFault,
    Command,
    Outcome,
    Record,
    SetBehavior,
    SetMaxThrottle,
    SetMode,
    SwapPilot,
)
from agent.core.control import NEEDS_OPERATOR, NEEDS_PILOT, ThrottleRamp, select
from agent.core.faults import Fault
from agent.core.handoff import Event
from agent.core.safety import EventSink, FaultMonitor
from agent.core.stops import StopRequest


class Pilot(Protocol):
    """What the decider needs of the autopilot: forgetting its state, choosing a behaviour."""

    def reset(self) -> None: ...

    def set_behavior(self, index: int) -> None: ...


def describe_pilot(pilot: object) -> dict[str, Any]:
    """The label of a pilot loaded from a file (development, or the configured model): its path and kind."""
    path = getattr(pilot, "path", None)
    return {"path": str(path), "kind": getattr(pilot, "kind", None)} if path is not None else {}


@dataclass(slots=True)
class Inference:
    """The model's result on this cycle's frame."""

    angle: float = 0.0
    throttle: float = 0.0
    invoke_s: float = 0.0
    prepare_s: float = 0.0
    failure: str = ""  # the exception, or "non-finite output"


@dataclass(slots=True)
class CycleInputs:
    now: float
    frame_age: float  # now minus the newest frame's capture time (inf before the first)
    camera_error: str = ""  # what the camera raised this cycle
    inference: Inference | None = None  # None: the model did not run this cycle
    manual: tuple[float, float, float] = (0.0, 0.0, -math.inf)  # angle, throttle, arrival


UNGATED = (True, "", math.inf)  # no attestation required: always clear


@dataclass(slots=True)
class Decision:
    steering: float
    throttle: float
    ok: bool  # no fault: the command is the car's own, not a fault's neutral


class Decider:
    """The core's rules, stepped by the drive thread once per cycle (phase 1 then phase 2)."""

    def __init__(self, config: DriveConfig, faults: FaultMonitor, events: EventSink, *,
                 can_record: bool = False, gated_modes: frozenset[str] = frozenset()) -> None:
        self.config = config
        # Modes that need a valid attestation (agent/attest): the autonomous ones, or every mode; none: no gate.
        self.gated_modes = gated_modes
        # The gate's verdict, set by the drive thread each cycle; with a gate, none until the first token.
        self.clearance: tuple[bool, str, float] = (
            (False, "no attestation token received yet", -math.inf) if gated_modes else UNGATED)
        self._was_attested = False  # a valid token was seen this run while in a gated mode
        self.faults = faults
        self.events = events
        self.can_record = can_record
        self.pilot: Any = None  # an Autopilot: set by the drive thread once the model has loaded, or by SwapPilot
        self.model_label: dict[str, Any] = {}  # what the pilot is: name, version, sha256 (status, events)
        self.mode: str = config.mode
        self.max_throttle = config.max_throttle
        self.recording = can_record  # a `record` command turns it off and on
        self.pilot_output = (0.0, 0.0)
        self._ramp = ThrottleRamp(config.throttle_ramp_per_s)
        self._overruns = 0
        self._neutral_since: float | None = None  # when the throttle decided last became neutral

    # -- phase 1: stops and commands, before the model runs (a mode change decides whether it does) --
    def accept_stops(self, requests: list[StopRequest], now: float, *, stall: str = "") -> None:
        for request in requests:
            self.faults.estop(request, now)
        if stall:
            self.faults.latch(Fault.DRIVE_STALL, now, stall)

    def apply(self, command: Command, now: float, *, held_by: str = "") -> Outcome:
        """Apply one command; its outcome is also stored on it and reported as an event."""
        outcome = self._apply(command, now, held_by)
        command.outcome = outcome
        if not command.reported:
            return outcome
        self.events.push(Event("command", {"name": command.name, "id": command.id, "source": command.source,
                                           "ok": outcome.ok, "reason": outcome.reason}, now))
        return outcome

    def _apply(self, command: Command, now: float, held_by: str) -> Outcome:
        if now > command.expires:
            return Outcome(False, f"expired: it waited {now - command.received:.2f} s for the drive core")
        if self.faults.latched and self._would_move(command):
            return Outcome(False, "refused: a fault is latched (clear it first)")
        if isinstance(command, ClearFault):
            fault = Fault(command.fault) if command.fault is not None else None  # checked at construction
            unattested = self.attested(now) if self.mode in self.gated_modes else ""
            if unattested and fault in (None, Fault.ATTESTATION) and self.faults.is_active(Fault.ATTESTATION):
                return Outcome(False, f"refused: still not attested ({unattested}); switch to user mode, or wait "
                                      "for a valid attestation token")
            refused = self.faults.clear(fault, received=command.received, now=now, source=command.source,
                                        held_by=held_by)
            return Outcome(not refused, "; ".join(refused))
        if isinstance(command, SetMode):
            return self._set_mode(command, now)
        if isinstance(command, SetMaxThrottle):
            self.max_throttle = command.value
            return Outcome(True)
        if isinstance(command, Record):
            if not self.can_record:
                return Outcome(False, "no recording configured (recording.path or --record)")
            self.recording = command.on
            return Outcome(True)
        if isinstance(command, SwapPilot):
            return self._swap_pilot(command, now)
        if isinstance(command, SetBehavior):
            if self.pilot is None:
                return Outcome(False, "no autopilot")
            try:
                self.pilot.set_behavior(command.index)
            except (ValueError, TypeError) as exc:
                return Outcome(False, str(exc))
            return Outcome(True)
        return Outcome(False, f"unknown command {command.name!r}")

    def stopped(self, now: float) -> str:
        """"" while the car counts as stopped, else why not. Stopped: a fault holds it in neutral, or the
        throttle decided has been neutral for ``stopped_after_ms`` (the car has had time to coast to a halt)."""
        if not self.faults.ok:
            return ""
        if self._neutral_since is None:
            return "the car is moving (throttle is not neutral)"
        hold = self.config.stopped_after_ms / 1000.0
        if now - self._neutral_since < hold:
            return f"the throttle has been neutral for {now - self._neutral_since:.1f} s of {hold:g} s"
        return ""

    def _swap_pilot(self, command: SwapPilot, now: float) -> Outcome:
        moving = self.stopped(now)
        if moving:
            return Outcome(False, f"refused: {moving}; a model is changed only while the car is stopped")
        command.replaced, self.pilot = self.pilot, command.pilot
        previous, self.model_label = self.model_label, dict(command.label)
        self.pilot.reset()
        self.events.push(Event("model_swapped", {"from": previous, "to": self.model_label, "source": command.source},
                               now))
        return Outcome(True)

    def _would_move(self, command: Command) -> bool:
        """The latched-fault gate: what could make the car move once the fault is cleared."""
        if isinstance(command, SetMode):
            return command.mode != "user"
        if isinstance(command, SetMaxThrottle):
            return command.value > self.max_throttle
        return False

    def attested(self, now: float) -> str:
        """"" while the attestation gate allows driving (a valid token, not expired on the core's clock), else why."""
        may_drive, reason, until = self.clearance
        if not may_drive:
            return reason or "not attested"
        if now >= until:
            return "the attestation token has expired"
        return ""

    def _set_mode(self, command: SetMode, now: float) -> Outcome:
        if command.mode in NEEDS_PILOT and self.pilot is None:
            return Outcome(False, f"mode {command.mode!r} needs an autopilot model")
        unattested = self.attested(now) if command.mode in self.gated_modes else ""
        if unattested:
            return Outcome(False, f"refused: mode {command.mode!r} needs a valid attestation: {unattested}")
        if command.mode != self.mode:
            self.events.push(Event("mode", {"from": self.mode, "to": command.mode, "source": command.source}, now))
            self.mode = command.mode
            if self.pilot is not None:
                self.pilot.reset()
        return Outcome(True)

    @property
    def wants_pilot(self) -> bool:
        """Run the model this cycle: a mode that uses it, and no latched fault (whose neutral needs no
        model and clears only by command; a transient fault keeps the model running to see it recover)."""
        return self.mode in NEEDS_PILOT and self.pilot is not None and not self.faults.latched

    # -- phase 2: decide ----------------------------------------------------------------------------
    def decide(self, inputs: CycleInputs) -> Decision:
        config, faults, now = self.config, self.faults, inputs.now
        faults.observe(Fault.STALE_FRAME, inputs.frame_age > config.max_frame_age_ms / 1000.0, now,
                       "newest camera frame too old")
        faults.observe(Fault.CAMERA_ERROR, bool(inputs.camera_error), now, inputs.camera_error)
        self._observe_inference(inputs.inference, now)
        # The attestation gate: before the first valid token of this run the car waits in neutral (a transient
        # fault: a car that boots is not yet attested); losing it afterwards latches (it was driving).
        unattested = self.attested(now) if self.mode in self.gated_modes else ""
        if unattested and self._was_attested:
            faults.latch(Fault.ATTESTATION, now, unattested)
        faults.observe(Fault.AWAITING_ATTESTATION, bool(unattested) and not self._was_attested, now, unattested)
        if self.mode in self.gated_modes and not unattested:
            self._was_attested = True
        manual_angle, manual_throttle, manual_at = inputs.manual
        faults.observe(Fault.HEARTBEAT_LOST,
                       self.mode in NEEDS_OPERATOR and now - manual_at > config.heartbeat_timeout_ms / 1000.0, now,
                       "no manual control received")
        if not faults.ok:
            self._ramp.reset(now)
            self._neutral_since = now if self._neutral_since is None else self._neutral_since
            return Decision(0.0, 0.0, False)
        steering, target = select(self.mode, *self.pilot_output, manual_angle, manual_throttle,
                                  max_throttle=self.max_throttle, throttle_multiplier=config.throttle_multiplier)
        throttle = self._ramp.apply(target, now)
        if throttle != 0.0:
            self._neutral_since = None
        elif self._neutral_since is None:
            self._neutral_since = now
        return Decision(steering, throttle, True)

    def _observe_inference(self, inference: Inference | None, now: float) -> None:
        faults, config = self.faults, self.config
        if inference is not None:
            if not inference.failure:
                self.pilot_output = (inference.angle, inference.throttle)
            over = inference.invoke_s > config.inference_budget_ms / 1000.0
            self._overruns = self._overruns + 1 if over else 0
            overrun = self._overruns >= config.overrun_limit
            faults.observe(Fault.INFERENCE_ERROR, bool(inference.failure), now, inference.failure)
            faults.observe(Fault.INFERENCE_OVERRUN, overrun, now,
                           f"{self._overruns} inferences over {config.inference_budget_ms:g} ms" if overrun else "")
        elif self.mode not in NEEDS_PILOT:
            faults.observe(Fault.INFERENCE_ERROR, False, now)
            faults.observe(Fault.INFERENCE_OVERRUN, False, now)

    def restart_ramp(self, now: float) -> None:
        self._ramp.reset(now)
