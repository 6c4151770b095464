"""Logs on stderr: timestamps on a terminal; under systemd, journald priority prefixes and no timestamps."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.ratelimit import TokenBucket

# sd-daemon(3) prefixes: journald reads "<N>" at the start of a line as the syslog priority.
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITIES.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def under_journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


def configure_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


class RateLimit(logging.Filter):
    """At most ``burst`` lines per message template and ``per_s`` a second after that; then one
    line saying how many were suppressed. Keeps a flood (bad commands, a hostile peer) from
    reaching journald's own rate limit, which would drop the fault lines that matter.

    A template is the logger, the level, the format string and its first argument (the event
    kind or command name), so a flood of one kind never silences another.
    """

    def __init__(self, *, burst: int = 10, per_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.per_s = per_s
        self.clock = clock
        self._buckets: dict[tuple[Any, ...], tuple[TokenBucket, list[int]]] = {}  # key -> bucket, [suppressed]
        self.suppressed = 0
        self._lock = threading.Lock()  # filters run before the handler's own lock, on any thread

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            return self._admit(record)

    def _admit(self, record: logging.LogRecord) -> bool:
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        key = (record.name, record.levelno, record.msg, first if isinstance(first, str | int) else None)
        entry = self._buckets.get(key)
        if entry is None:
            if len(self._buckets) >= 1024:  # bounded: forget the oldest templates
                self._buckets.pop(next(iter(self._buckets)))
            entry = self._buckets[key] = (TokenBucket(self.per_s, self.burst, self.clock), [0])
        bucket, suppressed = entry
        if not bucket.take():
            suppressed[0] += 1
            self.suppressed += 1
            return False
        if suppressed[0]:
            record.msg = f"{record.msg} [{suppressed[0]} similar lines suppressed]"
            suppressed[0] = 0
        return True
