"""Recording off the caller's thread: a bounded, lock-free handoff to a writer thread.

The drive loop must never wait on a disk, and recording must never stop the car. ``submit``
appends to a deque (atomic under the GIL, no lock), or counts a drop when the backlog is full;
a background thread, which alone uses the ``TubWriter`` (it is not thread-safe), drains it.
Neither ``submit`` nor ``close`` raises: every record is counted instead, so that after
``close`` ``written + lost == submitted`` exactly (see ``stats``).

A full disk is expected on a car (an SD card filled by its own recordings): after a failed
write the thread discards records without touching the disk for ``backoff`` seconds (counted
in ``failed``), then tries again, so recording resumes when space is freed and a full disk costs
one attempt per second, not a JPEG encode and five syscalls per frame. Failures are logged once,
then summarised at most once per ``log_interval`` (a full disk at 20 Hz must not flood journald).

The caller hands the record over: it must not mutate the arrays in it afterwards (the drive
core passes fresh frames).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from agent.tub.writer import TubFormatError, TubWriter

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.005  # writer-thread wake-up period while the backlog is empty
BACKOFF_S = 1.0  # after a failed write, records are discarded without touching the disk this long
LOG_INTERVAL_S = 10.0  # at most one failure summary per this many seconds, after the first failure

Stats = dict[str, int | bool | str | None]


class TubRecorder:
    """Writes records submitted from any one producer thread to a tub, in order, off-thread.

    Counters (each written by one thread only, read by any):

    - ``submitted``: every ``submit`` call;
    - ``written``: records the writer stored (DonkeyCar reads exactly these);
    - ``dropped``: refused by ``submit`` (backlog full, or the recorder closed);
    - ``rejected``: values the writer cannot store (``TubFormatError``);
    - ``failed``: lost to the disk: writes that raised an ``OSError`` (undone by the writer),
      plus records discarded during the back-off after one (``backed_off`` of them);
    - ``unwritten``: still queued (or being written) when ``close`` gave up or returned;
    - ``lost`` = ``dropped + rejected + failed + unwritten``.
    """

    def __init__(
        self,
        writer: TubWriter,
        *,
        capacity: int = 256,
        name: str = "tub-recorder",
        backoff: float = BACKOFF_S,
        log_interval: float = LOG_INTERVAL_S,
    ) -> None:
        self.writer = writer
        self.capacity = capacity
        self.backoff = backoff
        self.log_interval = log_interval
        self._backlog: deque[Mapping[str, Any]] = deque()
        self._stop = threading.Event()  # drain what is queued, then close the writer
        self._abandon = threading.Event()  # close gave up waiting: stop taking records
        self._handover = threading.Lock()  # writer thread vs close only; submit never takes it
        self.submitted = 0
        self.written = 0
        self.dropped = 0
        self.rejected = 0
        self.failed = 0
        self.backed_off = 0
        self._abandoned = 0  # records close counted as unwritten while the thread still ran
        self._closed = False  # close() has returned: a record still queued is unwritten
        self._in_flight = False
        self._retry_at = 0.0
        self._failing = False
        self._last_log: float | None = None
        self._lost_at_log = 0
        self.last_error: str | None = None
        self.on_error: Callable[[str], None] | None = None  # called with each failure that is logged
        if writer.pending_error is not None:
            self._report(f"the tub cannot be written yet ({writer.pending_error}); "
                         f"retrying at most once per {backoff:g} s", time.monotonic())
            self._retry_at = time.monotonic() + backoff
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- the producer's side -----------------------------------------------------------------
    def submit(self, record: Mapping[str, Any]) -> bool:
        """Queue a record; never blocks, never raises. False (a counted drop) when it cannot be queued."""
        self.submitted += 1
        if len(self._backlog) >= self.capacity or self._stop.is_set():
            self.dropped += 1
            return False
        self._backlog.append(record)
        return True

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def unwritten(self) -> int:
        """Records that were queued but never written: left when ``close`` returned."""
        return self._abandoned + (len(self._backlog) if self._closed else 0)

    @property
    def lost(self) -> int:
        return self.dropped + self.rejected + self.failed + self.unwritten

    def stats(self) -> Stats:
        """Counters for telemetry and the final summary; ``written + lost == submitted`` after ``close``."""
        return {
            "submitted": self.submitted,
            "written": self.written,
            "lost": self.lost,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "failed": self.failed,
            "backed_off": self.backed_off,
            "unwritten": self.unwritten,
            "backlog": self.backlog,
            "failing": self._failing,
            "last_error": self.last_error,
        }

    def summary(self) -> str:
        """One line for a log: what was written and what was lost, by cause."""
        text = (f"{self.written} of {self.submitted} records written; {self.lost} lost "
                f"({self.dropped} backlog full, {self.rejected} rejected, {self.failed} disk errors, "
                f"{self.unwritten} unwritten at close)")
        return f"{text}; last error: {self.last_error}" if self.last_error else text

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._abandon.is_set():
                with self._handover:
                    record = self._take()
                if record is None:
                    if self._stop.is_set():
                        return
                    time.sleep(IDLE_POLL_S)
                    continue
                self._write(record)
        finally:
            self._close_writer()

    def _take(self) -> Mapping[str, Any] | None:
        if self._abandon.is_set():
            return None
        try:
            record = self._backlog.popleft()
        except IndexError:
            return None
        self._in_flight = True
        return record

    def _write(self, record: Mapping[str, Any]) -> None:
        now = time.monotonic()
        if now < self._retry_at:  # backing off after a failure: do not touch the disk
            self._count(self._discard)
            return
        try:
            self.writer.write(record)
        except TubFormatError as exc:
            self._count(partial(self._rejected, f"record rejected: {exc}", now))
        except Exception as exc:  # OSError mostly; anything else must not kill the thread either
            self._retry_at = time.monotonic() + self.backoff
            detail = str(exc) if isinstance(exc, OSError) else repr(exc)
            self._count(partial(self._failed, f"tub write failed: {detail}", now))
        else:
            self._count(partial(self._written, now))

    def _count(self, account: Callable[[], None]) -> None:
        """Count the record in flight, unless close already counted it as unwritten."""
        with self._handover:
            self._in_flight = False
            if not self._abandon.is_set():
                account()

    def _discard(self) -> None:
        self.failed += 1
        self.backed_off += 1

    def _rejected(self, message: str, now: float) -> None:
        self.rejected += 1
        self._report(message, now)

    def _failed(self, message: str, now: float) -> None:
        self.failed += 1
        self._failing = True
        self._report(message, now)

    def _written(self, now: float) -> None:
        self.written += 1
        if self._failing:
            self._failing = False
            if self._may_log(now):
                log.warning("%s: recording resumed; %d records lost since the last report", self.writer.path,
                            self.lost - self._lost_at_log)
                self._logged(now)

    def _close_writer(self) -> None:
        try:
            self.writer.close()
        except Exception as exc:
            self.last_error = f"closing the tub failed: {exc}"
            log.error("%s: %s", self.writer.path, self.last_error)

    # -- reporting, rate-limited ------------------------------------------------------------------
    def _report(self, message: str, now: float) -> None:
        """Log the first failure, then at most one summary per ``log_interval``; counters hold the rest."""
        self.last_error = message
        if self._last_log is None:
            log.error("%s: %s (recording goes on; further failures are summarised every %.0f s)",
                      self.writer.path, message, self.log_interval)
        elif self._may_log(now):
            log.error("%s: %d records lost in the last %.0f s; latest: %s", self.writer.path,
                      self.lost - self._lost_at_log, now - self._last_log, message)
        else:
            return
        self._logged(now)
        if self.on_error is not None:
            self.on_error(message)

    def _may_log(self, now: float) -> bool:
        return self._last_log is None or now - self._last_log >= self.log_interval

    def _logged(self, now: float) -> None:
        self._last_log = now
        self._lost_at_log = self.lost

    # -- closing --------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and close the tub, within ``timeout`` seconds; never raises. Idempotent.

        If the writer thread is not done by then (a hung disk), what it has not written is
        counted as ``unwritten`` and the thread closes the tub when its current write returns.
        """
        if self._closed:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._handover:
                self._abandon.set()
                self._abandoned = int(self._in_flight)
            log.error("%s: the recorder did not finish within %.1f s; %d records unwritten", self.writer.path,
                      timeout, self._abandoned + len(self._backlog))
        self._closed = True
        if self.lost > self._lost_at_log and self._last_log is not None:
            log.warning("%s: recording closed: %s", self.writer.path, self.summary())

    def __enter__(self) -> TubRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
