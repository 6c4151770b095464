"""Absolute deadlines on the monotonic clock, in the manner of openpilot's Ratekeeper.

Unlike DonkeyCar's ``sleep(period - elapsed)``, the next deadline is always the previous one
plus the period, so error never accumulates (no drift). A late cycle does not cause a
burst: missed periods are skipped and counted. Lag is reported through ``lagging`` and the
counters, never printed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateKeeper:
    def __init__(
        self,
        rate_hz: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.period = 1.0 / rate_hz
        self._clock = clock
        self._sleep = sleep
        self.next_deadline = clock() + self.period
        self.missed_periods = 0
        self.lateness = 0.0  # of the last wake-up, s
        self._recent_lateness = 0.0  # exponential average

    def reset(self) -> None:
        self.next_deadline = self._clock() + self.period

    def wait(self) -> float:
        """Sleep until the next deadline; returns how late the wake-up was (s, >= 0)."""
        remaining = self.next_deadline - self._clock()
        if remaining > 0:
            self._sleep(remaining)
        return self.advance()

    def advance(self) -> float:
        """Account for a cycle that started now (without sleeping): the camera-paced path."""
        now = self._clock()
        lateness = max(0.0, now - self.next_deadline)
        if lateness >= self.period:  # skip whole missed periods instead of catching up
            missed = math.floor(lateness / self.period)
            self.missed_periods += missed
            self.next_deadline += missed * self.period
            lateness = now - self.next_deadline
        self.next_deadline += self.period
        self.lateness = lateness
        self._recent_lateness += (lateness - self._recent_lateness) * 0.05
        return lateness

    @property
    def lagging(self) -> bool:
        """Recent wake-ups are on average more than a tenth of a period late."""
        return self._recent_lateness > 0.1 * self.period
