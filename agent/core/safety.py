"""The fault monitor: which faults are active, and so whether the car may move.

A pure state machine with time passed in, so every state x event pair is testable without
threads or clocks (tests/test_fault_monitor.py). Transient faults clear themselves once their
condition has been gone for ``clear_hold`` seconds; latched faults (agent/core/faults.py) stay
until an explicit clear. An e-stop holds for at least ``estop_hold`` seconds: a clear counts
only if it *arrived* (``received``) that long after the newest e-stop request, so a clear sent
before an e-stop, or one that raced it through another path, can never undo it; and no clear
counts while any source still holds its e-stop level (a button still pressed). Every
transition is an Event. Only the drive thread calls this; other threads read the core's
published snapshot, never this object.
"""

from __future__ import annotations

import math
from typing import Protocol

from agent.core.faults import LATCHED, Fault
from agent.core.handoff import Event
from agent.core.stops import StopRequest


class EventSink(Protocol):
    def push(self, item: Event) -> bool: ...


class FaultMonitor:
    def __init__(self, events: EventSink, *, clear_hold: float = 0.3, estop_hold: float = 1.0) -> None:
        self.events = events
        self.clear_hold = clear_hold
        self.estop_hold = estop_hold
        self._active: dict[Fault, str] = {}  # fault -> why
        self._healthy_since: dict[Fault, float] = {}
        self.estop_at = -math.inf  # arrival of the newest e-stop request
        self.version = 0  # bumped on every change of the active set, so readers rebuild views only then

    # -- reading (drive thread) -----------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """The car may move: no fault is active."""
        return not self._active

    def is_active(self, fault: Fault) -> bool:
        return fault in self._active

    @property
    def latched(self) -> bool:
        return any(fault in LATCHED for fault in self._active)

    def active(self) -> dict[str, str]:
        """A copy: fault name -> why."""
        return {fault.value: detail for fault, detail in self._active.items()}

    def latched_faults(self) -> dict[str, str]:
        return {fault.value: detail for fault, detail in self._active.items() if fault in LATCHED}

    # -- events -----------------------------------------------------------------------------------
    def observe(self, fault: Fault, present: bool, now: float, detail: str = "") -> None:
        """Report the condition behind a transient fault for this cycle."""
        if present:
            self._healthy_since.pop(fault, None)
            if fault not in self._active:
                self._raise(fault, detail, now)
        elif fault in self._active and fault not in LATCHED:
            since = self._healthy_since.setdefault(fault, now)
            if now - since >= self.clear_hold:
                del self._active[fault]
                del self._healthy_since[fault]
                self.version += 1
                self.events.push(Event("fault_cleared", {"fault": fault.value, "by": "recovered"}, now))

    def latch(self, fault: Fault, now: float, detail: str = "") -> None:
        """Raise a latched fault; it stays until ``clear``."""
        if fault not in self._active:
            self._raise(fault, detail, now)

    def estop(self, request: StopRequest, now: float) -> None:
        """An e-stop request: latch, and restart the minimum hold from when it arrived."""
        self.estop_at = max(self.estop_at, request.at)
        self.events.push(Event("estop", {"source": request.source, "reason": request.reason, "id": request.id}, now))
        self.latch(Fault.ESTOP, now, f"e-stop from {request.source}: {request.reason}")

    def restore(self, fault: Fault, detail: str, now: float) -> None:
        """Re-latch a fault persisted by an earlier run (an e-stop's hold restarts now)."""
        if fault is Fault.ESTOP:
            self.estop_at = max(self.estop_at, now)
        self.latch(fault, now, detail)

    def clear(self, fault: Fault | None, *, received: float, now: float, source: str = "local",
              held_by: str = "") -> list[str]:
        """Clear latched faults (one, or all with None). Returns a reason for each one refused.

        ``received`` is when the clear entered the agent; ``held_by`` names a source still holding
        an e-stop level ("" when none).
        """
        refused = []
        targets = [fault] if fault is not None else [f for f in self._active if f in LATCHED]
        for target in targets:
            if target not in self._active:
                continue
            if target not in LATCHED:
                refused.append(f"{target.value} clears by itself once its cause is gone")
                continue
            if target is Fault.ESTOP:
                if held_by:
                    refused.append(f"the e-stop is still held ({held_by})")
                    continue
                if received < self.estop_at + self.estop_hold:
                    refused.append(f"an e-stop holds for at least {self.estop_hold:g} s; this clear arrived "
                                   f"{received - self.estop_at:+.3f} s after it")
                    continue
            del self._active[target]
            self.version += 1
            self.events.push(Event("fault_cleared", {"fault": target.value, "by": source}, now))
        return refused

    def _raise(self, fault: Fault, detail: str, now: float) -> None:
        self._active[fault] = detail
        self.version += 1
        self.events.push(Event("fault", {"fault": fault.value, "detail": detail, "latched": fault in LATCHED}, now))
