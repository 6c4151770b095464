"""The newest item from a producer thread, and a wait for one newer than the last seen.

Cameras and the simulator client publish frames here: one producer, any readers. Readers
that only look at ``latest`` take no lock (a reference read); ``read`` waits on a condition.
"""

from __future__ import annotations

import threading
import time
from typing import Generic, Protocol, TypeVar


class Sequenced(Protocol):
    @property
    def seq(self) -> int: ...


T = TypeVar("T", bound=Sequenced)


class LatestSlot(Generic[T]):
    def __init__(self) -> None:
        self.latest: T | None = None
        self._condition = threading.Condition()
        self.closed = False

    def publish(self, item: T) -> None:
        with self._condition:
            self.latest = item
            self._condition.notify_all()

    def read(self, after_seq: int, timeout: float) -> T | None:
        """The newest item with ``seq > after_seq``, waiting up to ``timeout`` s; None on timeout or close."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                latest = self.latest
                if latest is not None and latest.seq > after_seq:
                    return latest
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    return None
                self._condition.wait(remaining)

    def close(self) -> None:
        """Wake every reader; reads return None from now on unless something newer is there."""
        with self._condition:
            self.closed = True
            self._condition.notify_all()
