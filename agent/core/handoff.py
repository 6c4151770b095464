"""Bounded, lock-free handoffs between the drive thread and the rest of the agent.

Each queue has exactly one producer and one consumer. ``collections.deque`` append and
popleft are atomic under the GIL and take no lock; the length check before appending is
only racy towards the consumer (who can only make room), so the bound holds. When full,
the newest item is dropped and counted: the drive thread never waits.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Command:
    """A request into the drive core, applied at the start of its next cycle."""

    name: str  # "set_mode", "estop", "clear_fault", "user", "set_max_throttle", "set_behavior"
    value: Any = None
    source: str = "local"
    id: str | None = None  # echoed in the result event, so a requester can match it
    monotonic: float = field(default_factory=time.monotonic)


class EventQueue(BoundedHandoff[Event]):
    def __init__(self, capacity: int = 1024) -> None:
        super().__init__(capacity)


class CommandQueue(BoundedHandoff[Command]):
    def __init__(self, capacity: int = 256) -> None:
        super().__init__(capacity)
