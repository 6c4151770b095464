"""Typed commands into the drive core, and the per-source lanes that carry them.

A command is validated once, where it enters the agent (the MQTT parser, the reload handler, a
test): the classes below refuse a wrong type or range at construction, so the core only ever
sees typed, checked values. Each command carries when it arrived and when it expires; the core
re-checks both (and the latched-fault gate) when it applies it, so a command reported "timeout"
to a requester can never take effect later.

E-stops are *not* commands: they are state on the ``StopBoard`` (agent/core/stops.py), read by
the core every cycle, so no lane bound can drop one. Manual control is not a command either: it
is the newest value in a ``ManualControl`` slot, read every cycle.

Lanes: one bounded, lock-free queue per source, each with a single producer thread and the drive
thread as its consumer. A lane refuses (and the producer answers or counts) instead of dropping:
when the commands it has handed over and the core has not yet taken reach its capacity, or when
the source exceeds its rate limit.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from agent.core.control import MODES
from agent.core.faults import Fault
from agent.errors import AgentError
from agent.ratelimit import TokenBucket


class CommandError(AgentError, ValueError):
    """A command value of the wrong type or range: the message says which and why."""


@dataclass(slots=True)
class Outcome:
    ok: bool
    reason: str = ""


@dataclass(slots=True, kw_only=True)
class Command:
    """What every command carries besides its value. ``outcome`` is set once, by the core."""

    source: str = "local"
    id: str | None = None  # echoed in the result, so a requester can match it
    received: float = field(default_factory=time.monotonic)  # when it entered the agent
    expires: float = math.inf  # monotonic; the core refuses it after this
    outcome: Outcome | None = None

    name: ClassVar[str] = "command"
    moves_the_car: ClassVar[bool] = False  # refused while a fault is latched (see ``Decider``)
    answer_within_s: ClassVar[float | None] = None  # a long job's time to an outcome (None: its expiry)
    reported: ClassVar[bool] = True  # each application is a `command` event


@dataclass(slots=True, kw_only=True)
class SetMode(Command):
    mode: str
    name: ClassVar[str] = "set_mode"

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise CommandError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r:.40}")


@dataclass(slots=True, kw_only=True)
class SetMaxThrottle(Command):
    value: float
    name: ClassVar[str] = "set_max_throttle"

    def __post_init__(self) -> None:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not 0.0 <= value <= 1.0:
            raise CommandError(f"max throttle must be a number in [0, 1], not {value!r:.40}")
        self.value = float(value)


@dataclass(slots=True, kw_only=True)
class ClearFault(Command):
    fault: Fault | str | None = None  # a name is checked and becomes a Fault; None: every latched fault
    name: ClassVar[str] = "clear_fault"

    def __post_init__(self) -> None:
        if self.fault is not None and not isinstance(self.fault, Fault):
            try:
                self.fault = Fault(self.fault)
            except ValueError:
                raise CommandError(f"unknown fault {self.fault!r:.40}; faults: "
                                   f"{', '.join(f.value for f in Fault)}") from None


@dataclass(slots=True, kw_only=True)
class Record(Command):
    on: bool
    name: ClassVar[str] = "record"

    def __post_init__(self) -> None:
        if not isinstance(self.on, bool):
            raise CommandError(f"record takes true or false, not {self.on!r:.40}")


@dataclass(slots=True, kw_only=True)
class SetBehavior(Command):
    index: int
    name: ClassVar[str] = "set_behavior"

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise CommandError(f"behavior must be a non-negative integer, not {self.index!r:.40}")


@dataclass(slots=True, kw_only=True)
class SwapPilot(Command):
    """A new autopilot for the core, loaded and warmed off the drive thread and handed over by reference.

    The core applies it only while the car is stopped (``Decider.stopped``), between two cycles; it then puts
    the pilot it replaced in ``replaced``, so that the sender releases it off the drive thread (an interpreter's
    teardown takes milliseconds the loop does not have).
    """

    pilot: Any  # an Autopilot: prepare / invoke / result / reset / set_behavior
    label: Mapping[str, Any] = field(default_factory=dict)  # name, version, sha256: events and status
    replaced: Any = None
    name: ClassVar[str] = "swap_pilot"
    # Offered again every second while the car moves: the rollout reports the wait once per reason, and the
    # core a `model_swapped` event when it applies one.
    reported: ClassVar[bool] = False

    def __post_init__(self) -> None:
        missing = [m for m in ("prepare", "invoke", "result", "reset") if not callable(getattr(self.pilot, m, None))]
        if missing:
            raise CommandError(f"swap_pilot needs an autopilot; {type(self.pilot).__name__} lacks {', '.join(missing)}")


class CommandLane:
    """Commands from one source to the drive core: bounded, rate-limited, lock-free.

    ``submit`` (the source's one producer thread) returns "" when the command was handed over
    or the reason it was refused; ``take`` (the drive thread) pops the oldest. The bound counts
    commands handed over and not yet taken (``pushed - taken``: each counter has one writer),
    so the drive thread never waits and nothing is dropped silently.
    """

    def __init__(self, source: str, *, capacity: int = 32, rate_per_s: float = math.inf, burst: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.capacity = capacity
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._items: deque[Command] = deque()
        self.pushed = 0  # written by the producer only
        self.taken = 0  # written by the drive thread only
        self.refused_full = 0
        self.refused_rate = 0
        self._bucket = TokenBucket(rate_per_s, burst, clock)

    def submit(self, command: Command) -> str:
        """Hand a command to the core; "" on success, else why it was refused (nothing changed)."""
        if self.pushed - self.taken >= self.capacity:
            self.refused_full += 1
            return f"refused: the {self.source} command lane is full ({self.capacity} waiting)"
        if not self._bucket.take():
            self.refused_rate += 1
            return f"refused: over the {self.source} rate limit ({self.rate_per_s:g} commands/s)"
        command.source = self.source
        self._items.append(command)
        self.pushed += 1
        return ""

    def take(self) -> Command | None:
        try:
            command = self._items.popleft()
        except IndexError:
            return None
        self.taken += 1
        return command

    def __len__(self) -> int:
        return self.pushed - self.taken

    def stats(self) -> dict[str, int]:
        return {"waiting": len(self), "refused_full": self.refused_full, "refused_rate": self.refused_rate}


class CommandLanes:
    """The drive core's inbound lanes, one per source; the core takes from each in turn."""

    def __init__(self) -> None:
        self._lanes: tuple[CommandLane, ...] = ()

    def add(self, lane: CommandLane) -> CommandLane:
        """Register a lane (copy-on-write: the drive thread iterates a tuple that never changes under it)."""
        if any(existing.source == lane.source for existing in self._lanes):
            raise ValueError(f"a lane for source {lane.source!r} exists already")
        self._lanes = (*self._lanes, lane)
        return lane

    def get(self, source: str) -> CommandLane | None:
        return next((lane for lane in self._lanes if lane.source == source), None)

    def __iter__(self) -> Iterator[CommandLane]:
        return iter(self._lanes)

    def stats(self) -> dict[str, dict[str, int]]:
        return {lane.source: lane.stats() for lane in self._lanes}
