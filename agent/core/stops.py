"""E-stop inputs as state the drive core reads every cycle: a stop is a level, not a message.

Each source (the button, MQTT, a signal, a test, later attestation or a dashboard) gets its own
``StopSource`` with one writer thread. A *press* bumps a counter (with when and why); a *hold*
is a level, e.g. a button still pressed. The core compares every source's counter with what it
has already seen each cycle, so a press can be neither dropped by a queue bound nor reordered
behind a clear; a held level refuses any clear while it lasts. No locks: each attribute has one
writer (the source for its request fields, the drive thread for ``seen``), and the writer
stores the details before the counter, so a reader that sees a new count sees its details.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopRequest:
    source: str
    reason: str
    at: float  # monotonic: when the request entered the agent (the e-stop hold counts from here)
    id: str | None = None


class StopSource:
    """One e-stop input. ``press`` and ``hold`` are called from this source's thread only."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.presses = 0  # requests made (written by the source)
        self.seen = 0  # requests the core has latched (written by the drive thread)
        self.last: StopRequest | None = None
        self.held = False  # a level: the button is down
        self.held_reason = ""

    def press(self, reason: str, *, id: str | None = None, at: float | None = None) -> int:
        """Request an e-stop; returns its number, to compare with ``seen`` (latched once seen >= it)."""
        self.last = StopRequest(self.name, reason, self._clock() if at is None else at, id)
        self.presses += 1
        return self.presses

    def hold(self, held: bool, reason: str = "") -> None:
        """Set the level. Rising also presses (it latches); falling only allows a later clear."""
        if held and not self.held:
            self.held_reason = reason
            self.held = True
            self.press(reason)
        elif not held:
            self.held = False

    def acknowledged(self, number: int) -> bool:
        return self.seen >= number


class StopBoard:
    """Every e-stop source of one car. Register sources before the core starts, or at any time
    (copy-on-write: the drive thread iterates a tuple that never changes under it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sources: tuple[StopSource, ...] = ()

    def source(self, name: str) -> StopSource:
        """The source called ``name``, created on first use."""
        for existing in self._sources:
            if existing.name == name:
                return existing
        created = StopSource(name, self._clock)
        self._sources = (*self._sources, created)
        return created

    @property
    def sources(self) -> tuple[StopSource, ...]:
        return self._sources

    def new_requests(self) -> list[StopRequest]:
        """Drive thread: requests not yet seen, marking them seen (the caller latches them now)."""
        found: list[StopRequest] = []
        for source in self._sources:
            presses = source.presses
            if presses > source.seen:
                last = source.last
                if last is not None:
                    found.append(last)
                source.seen = presses
        return found

    def held_by(self) -> str:
        """The first source holding its level ("" when none): a clear is refused while one holds."""
        for source in self._sources:
            if source.held:
                return source.name
        return ""

    def latest_press(self) -> float:
        """When the newest request arrived (monotonic), or -inf."""
        times = [s.last.at for s in self._sources if s.last is not None]
        return max(times) if times else -math.inf
