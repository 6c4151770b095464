"""One token bucket for every rate limit in the agent: command lanes, answers to the fleet, log lines."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; ``take`` spends one or says no. An infinite rate never says no.

    Not thread-safe: one caller thread per bucket (or the caller's own lock).
    """

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s, self.burst = rate_per_s, float(burst)
        self._clock = clock
        self.tokens, self._refilled = float(burst), clock()

    def take(self) -> bool:
        if math.isinf(self.rate_per_s):
            return True
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._refilled) * self.rate_per_s)
        self._refilled = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
