"""The dead-man monitor: neutral from outside the drive thread when the drive thread stops cycling.

The drive thread promises, before every wait and after every cycle, the moment by which it will
have completed its next cycle (``DriveCore.alive_until``). A separate thread checks that promise
every period; once it is broken, the monitor writes neutral to the actuators itself and sets
``tripped``, which the drive thread turns into a latched ``drive_stall`` fault if it ever comes
back. This works without systemd (the watchdog stays as the outer layer, and restarts the whole
process), and it also fires when the drive thread is stuck in a camera read, a model, or a
blocked actuator write, as long as this thread and the GIL still run. It runs one step above
the drive thread's SCHED_FIFO priority where that is allowed, so a drive thread spinning at
real-time priority cannot starve it.

What it cannot do: a write that hangs the bus also hangs this thread's neutral (it retries every
second while the stall lasts); a write already in flight on the stuck thread may land after the
monitor's neutral, until the drive thread's next cycle writes neutral for the latched fault.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from agent.core.handoff import Event, EventQueue
from agent.hw.interfaces import Actuators

log = logging.getLogger(__name__)

RETRY_S = 1.0  # neutral again this often while the stall lasts


class Watched(Protocol):
    alive_until: float  # monotonic: the drive thread's promise


class Deadman:
    def __init__(self, watched: Watched, actuators: Actuators, *, period: float, priority: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.watched = watched
        self.actuators = actuators
        self.period = period
        self.priority = priority
        self.clock = clock
        self.events = EventQueue(64)  # this thread's own: one producer per queue
        self.tripped = ""  # written here, read (and acknowledged) by the drive thread
        self.trips = 0
        self.neutral_failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drive-deadman", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def _run(self) -> None:
        self._raise_priority()
        last_neutral = -1e9
        while not self._stop.wait(self.period / 2):
            now = self.clock()
            late = now - self.watched.alive_until
            if late <= 0:
                continue
            if not self.tripped:
                self.trips += 1
                self.tripped = f"the drive thread missed its cycles for {late * 1000:.0f} ms past its deadline"
                self.events.push(Event("deadman", {"detail": self.tripped, "action": "neutral"}, now))
            if now - last_neutral >= RETRY_S:
                last_neutral = now
                self._neutral(now)

    def _neutral(self, now: float) -> None:
        try:
            self.actuators.neutral()
        except Exception as exc:  # a failing backend must not end the monitor
            self.neutral_failures += 1
            self.events.push(Event("deadman_neutral_failed", {"error": f"{type(exc).__name__}: {exc}"}, now))

    def acknowledge(self) -> str:
        """Drive thread: the stall it missed ("" if none), clearing it for the next one."""
        tripped = self.tripped
        if tripped:
            self.tripped = ""
        return tripped

    def _raise_priority(self) -> None:
        if self.priority <= 0:
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(min(99, self.priority + 1)))
        except OSError as exc:
            log.debug("dead-man monitor without SCHED_FIFO: %s", exc.strerror)
