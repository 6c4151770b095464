"""Recording off the caller's thread: a bounded, lock-free handoff to a writer thread.

The drive loop must never wait on a disk. ``submit`` appends to a deque (atomic under the
GIL, no lock), or counts a drop when the backlog is full; a background thread drains it
into a ``TubWriter``. The caller hands the record over: it must not mutate the arrays in it
afterwards (the drive core passes fresh frames).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from agent.tub.writer import TubFormatError, TubWriter

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.005  # writer-thread wake-up period while the backlog is empty


class TubRecorder:
    """Writes records submitted from any one producer thread to a tub, in order, off-thread."""

    def __init__(self, writer: TubWriter, *, capacity: int = 256, name: str = "tub-recorder") -> None:
        self.writer = writer
        self.capacity = capacity
        self._backlog: deque[Mapping[str, Any]] = deque()
        self._stop = threading.Event()
        self.submitted = 0
        self.written = 0
        self.dropped = 0  # backlog full when submitted
        self.rejected = 0  # records the writer refused (bad values)
        self.failed = 0  # I/O errors
        self.last_error: str | None = None
        self.on_error: Callable[[str], None] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, record: Mapping[str, Any]) -> bool:
        """Queue a record; never blocks. Returns False (and counts a drop) when the backlog is full."""
        if len(self._backlog) >= self.capacity or self._stop.is_set():
            self.dropped += 1
            return False
        self._backlog.append(record)
        self.submitted += 1
        return True

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def _run(self) -> None:
        while True:
            try:
                record = self._backlog.popleft()
            except IndexError:
                if self._stop.is_set():
                    return
                time.sleep(IDLE_POLL_S)
                continue
            try:
                self.writer.write(record)
                self.written += 1
            except TubFormatError as exc:
                self.rejected += 1
                self._report(f"record rejected: {exc}")
            except OSError as exc:
                self.failed += 1
                self._report(f"tub write failed: {exc}")

    def _report(self, message: str) -> None:
        if self.last_error is None:  # log the first of each run; counters hold the rest
            log.error("%s: %s", self.writer.path, message)
        self.last_error = message
        if self.on_error is not None:
            self.on_error(message)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then close the tub. Idempotent."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("%s: recorder did not drain within %.1f s; %d records lost", self.writer.path,
                      timeout, len(self._backlog))
        self.writer.close()

    def __enter__(self) -> TubRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
