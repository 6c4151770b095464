"""Bounded, lock-free handoffs between the drive thread and the rest of the agent.

Events go out through a bounded queue (dropped and counted when full: the drive thread never
waits); manual control comes in as the newest value (``ManualControl``), and so does the attestation
gate's verdict (``Clearance``). Commands travel in
per-source lanes (agent/core/commands.py) and e-stops are state (agent/core/stops.py).

Each queue has exactly one producer and one consumer. ``collections.deque`` append and
popleft are atomic under the GIL and take no lock; the length check before appending is
only racy towards the consumer (who can only make room), so the bound holds. When full,
the newest item is dropped and counted: the drive thread never waits.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class BoundedHandoff(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[T] = deque()
        self.dropped = 0

    def push(self, item: T) -> bool:
        if len(self._items) >= self.capacity:
            self.dropped += 1
            return False
        self._items.append(item)
        return True

    def pop(self) -> T | None:
        try:
            return self._items.popleft()
        except IndexError:
            return None

    def drain(self) -> list[T]:
        items = []
        while (item := self.pop()) is not None:
            items.append(item)
        return items

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class Event:
    """A state change of the drive core, for telemetry and the journal."""

    kind: str  # "fault", "fault_cleared", "mode", "estop", "started", "stopped", "realtime", ...
    detail: dict[str, Any] = field(default_factory=dict)
    monotonic: float = field(default_factory=time.monotonic)
    wall: float = field(default_factory=time.time)


class EventQueue(BoundedHandoff[Event]):
    def __init__(self, capacity: int = 1024) -> None:
        super().__init__(capacity)


class ManualControl:
    """The operator's newest steering and throttle, with when it arrived: a value, not a queue.

    One writer (the operator's input thread), read by the drive thread every cycle; the value
    and its time travel together in one tuple, so the reader never sees a mixed pair.
    """

    def __init__(self) -> None:
        self.latest: tuple[float, float, float] = (0.0, 0.0, -math.inf)  # angle, throttle, monotonic
        self.refused = 0

    def set(self, angle: float, throttle: float, at: float | None = None) -> bool:
        """Store a control; a non-finite value is refused (counted) and changes nothing."""
        if not (isinstance(angle, int | float) and isinstance(throttle, int | float)
                and math.isfinite(angle) and math.isfinite(throttle)):
            self.refused += 1
            return False
        self.latest = (_unit(angle), _unit(throttle), time.monotonic() if at is None else at)
        return True


def _unit(value: float) -> float:
    return max(-1.0, min(1.0, float(value)))


class Clearance:
    """Whether the car may drive autonomously, from the attestation gate: a value, not a queue.

    One writer (the agent's loop, which checks the fleet's signed tokens), read by the drive thread every cycle.
    ``valid_until`` is on the core's clock (monotonic): the token's own expiry, so the core stops the car when
    it passes even if nothing writes here again (a hung loop, a lost broker).
    """

    def __init__(self) -> None:
        self.latest: tuple[bool, str, float] = (False, "no attestation token received yet", -math.inf)

    def set(self, may_drive: bool, reason: str, valid_until: float) -> None:
        self.latest = (bool(may_drive), str(reason), float(valid_until) if may_drive else -math.inf)
