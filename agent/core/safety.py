"""The safety supervisor: which faults are active, and so whether the car may move.

A pure state machine with time passed in, so every state x event pair is testable without
threads or clocks. Transient faults (stale frame, inference error or overrun streak, lost
manual-control heartbeat) clear themselves once their condition has been gone for
``clear_hold`` seconds; latched faults (e-stop, actuator failure) stay until an explicit
clear, and an e-stop only clears once its button is released. Every transition is an Event.
"""

from __future__ import annotations

from enum import StrEnum

from agent.core.handoff import Event, EventQueue


class Fault(StrEnum):
    STALE_FRAME = "stale_frame"
    INFERENCE_ERROR = "inference_error"
    INFERENCE_OVERRUN = "inference_overrun"
    HEARTBEAT_LOST = "heartbeat_lost"
    ACTUATOR_FAILURE = "actuator_failure"
    ESTOP = "estop"


LATCHED = frozenset({Fault.ACTUATOR_FAILURE, Fault.ESTOP})


class Supervisor:
    def __init__(self, events: EventQueue, *, clear_hold: float = 0.3) -> None:
        self.events = events
        self.clear_hold = clear_hold
        self.active: dict[Fault, str] = {}  # fault -> why
        self._healthy_since: dict[Fault, float] = {}
        self.estop_held = False  # a physical e-stop button still pressed

    @property
    def ok(self) -> bool:
        """The car may move: no fault is active."""
        return not self.active

    def observe(self, fault: Fault, present: bool, now: float, detail: str = "") -> None:
        """Report the condition behind a transient fault for this cycle."""
        if present:
            self._healthy_since.pop(fault, None)
            if fault not in self.active:
                self._raise(fault, detail, now)
        elif fault in self.active and fault not in LATCHED:
            since = self._healthy_since.setdefault(fault, now)
            if now - since >= self.clear_hold:
                del self.active[fault]
                del self._healthy_since[fault]
                self.events.push(Event("fault_cleared", {"fault": fault.value, "by": "recovered"}, now))

    def latch(self, fault: Fault, now: float, detail: str = "") -> None:
        """Raise a latched fault (e-stop, actuator failure); stays until ``clear``."""
        if fault not in self.active:
            self._raise(fault, detail, now)

    def clear(self, fault: Fault | None, now: float, source: str = "local") -> list[str]:
        """Clear latched faults (one, or all with None). Returns a reason for each one refused."""
        refused = []
        targets = [fault] if fault is not None else [f for f in self.active if f in LATCHED]
        for target in targets:
            if target not in self.active:
                continue
            if target not in LATCHED:
                refused.append(f"{target.value} clears by itself once its cause is gone")
                continue
            if target is Fault.ESTOP and self.estop_held:
                refused.append("the e-stop button is still pressed")
                continue
            del self.active[target]
            self.events.push(Event("fault_cleared", {"fault": target.value, "by": source}, now))
        return refused

    def _raise(self, fault: Fault, detail: str, now: float) -> None:
        self.active[fault] = detail
        self.events.push(Event("fault", {"fault": fault.value, "detail": detail,
                                         "latched": fault in LATCHED}, now))
