"""Download a bundle over HTTP(S) with urllib3: bounded in size, time and disk, resumable, checked.

A car downloads over Wi-Fi that drops, from servers that may be misconfigured or hostile, onto a
small SD card. So every download has: a size cap (``models.max_bundle_mb``); connect and read
timeouts and an overall deadline (a server that trickles a byte a second cannot hold it forever);
resume with HTTP Range after a dropped connection (``If-Range`` pins the same file within a
download; across restarts only when the sha256 is known); a disk-space check before writing that
keeps a reserve free for the car's recordings and state; progress callbacks for events; and at the end
the size and sha256 the update announced. A server whose Content-Length disagrees with the
announced size is refused at its headers; one that sends more than it or the announcement said is
cut off; one whose connection ends early is resumed, then given up on with the byte counts.

The digest protects the download; the bundle's signature (checked after unpacking) protects the car.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import urllib3

from agent.bundle.errors import FetchError

Progress = Callable[[int, "int | None"], None]  # (bytes so far, total or None if the server did not say)
_CHUNK = 64 * 1024
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 256 * 1024 * 1024
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    deadline_s: float = 1800.0  # the whole download, all attempts
    attempts: int = 5  # consecutive attempts without progress before giving up
    keep_free_bytes: int = 64 * 1024 * 1024  # never fill the disk below this
    backoff_s: float = 0.5  # first pause between attempts; doubles, at most 10 s
    progress_interval_s: float = 1.0


class _RetryableError(Exception):
    """An attempt failed in a way another attempt may fix (a dropped connection, a 503, a timeout)."""


def fetch(url: str, destination: Path, *, sha256: str | None = None, size: int | None = None,
          limits: Limits | None = None, on_progress: Progress | None = None,
          pool: urllib3.PoolManager | None = None) -> Path:
    """Download ``url`` to ``destination`` (through ``destination.part``); returns ``destination``.

    ``sha256`` and ``size`` are what the update announced (either may be None). Raises FetchError.
    """
    limits = limits or Limits()
    if not url.startswith(("http://", "https://")):
        raise FetchError(f"{url}: only http:// and https:// URLs are fetched")
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise FetchError(f"announced sha256 {sha256!r} is not 64 lowercase hex digits")
    if size is not None and size > limits.max_bytes:
        raise FetchError(f"{url}: announced {size} bytes, more than the {limits.max_bytes} allowed "
                         "(models.max_bundle_mb)")
    download = _Download(url, destination, sha256, size, limits, on_progress,
                         pool or urllib3.PoolManager(num_pools=2))
    return download.run()


class _Download:
    def __init__(self, url: str, destination: Path, sha256: str | None, size: int | None, limits: Limits,
                 on_progress: Progress | None, pool: urllib3.PoolManager) -> None:
        self.url, self.destination, self.sha256, self.size = url, destination, sha256, size
        self.limits, self.on_progress, self.pool = limits, on_progress, pool
        self.part = destination.with_name(destination.name + ".part")
        self.total: int | None = size
        self.validator: str | None = None
        self.deadline = time.monotonic() + limits.deadline_s
        self.last_progress = 0.0

    @property
    def have(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    def run(self) -> Path:
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        # A .part from an earlier run is only trusted when the digest will check it.
        if self.part.exists() and (self.sha256 is None or (self.size is not None and self.have > self.size)):
            self.part.unlink()
        failures, last = 0, ""
        while not (self.size is not None and self.have == self.size):
            before = self.have
            try:
                if self._attempt():
                    break
                last = "the server closed the connection early"
            except _RetryableError as exc:
                last = str(exc)
            except urllib3.exceptions.HTTPError as exc:
                last = _describe(exc)
            failures = 0 if self.have > before else failures + 1
            if failures >= self.limits.attempts:
                raise FetchError(f"{self.url}: gave up after {failures} attempts without progress "
                                 f"({self.have} of {self._total_text()} bytes): {last}")
            pause = min(self.limits.backoff_s * 2 ** max(failures - 1, 0), 10.0)
            if time.monotonic() + pause >= self.deadline:
                raise FetchError(f"{self.url}: not complete within {self.limits.deadline_s:.0f} s "
                                 f"({self.have} of {self._total_text()} bytes): {last}")
            time.sleep(pause)
        self._report(force=True)
        self._check_digest()
        with self.part.open("rb") as handle:
            os.fsync(handle.fileno())
        self.part.replace(self.destination)
        directory = os.open(self.destination.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return self.destination

    def _total_text(self) -> str:
        return str(self.total) if self.total is not None else "?"

    def _attempt(self) -> bool:
        """One request; True when the file is complete. Raises _RetryableError, FetchError or urllib3's errors."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"{self.url}: not complete within {self.limits.deadline_s:.0f} s "
                             f"({self.have} of {self._total_text()} bytes)")
        have = self.have
        headers = {"Accept-Encoding": "identity", "User-Agent": "donkey-agent"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if self.validator:
                headers["If-Range"] = self.validator
        timeout = urllib3.Timeout(connect=min(self.limits.connect_timeout_s, remaining),
                                  read=min(self.limits.read_timeout_s, remaining))
        retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5,
                                raise_on_status=False, raise_on_redirect=True)
        response = self.pool.request("GET", self.url, headers=headers, preload_content=False, timeout=timeout,
                                     retries=retries)
        try:
            total = self._accept(response, have)
            return self._receive(response, total)
        finally:
            # Closed, not returned with unread bytes (an error page, a cut-off body) to poison the next request.
            response.close()
            response.release_conn()

    def _accept(self, response: urllib3.BaseHTTPResponse, have: int) -> int | None:
        """Check the status and headers; returns the file's total size if the server said it."""
        status = response.status
        length = _int_header(response, "Content-Length")
        if status == 200:
            if have:  # the server ignored the Range (or the file changed): start again
                self.part.unlink()
            total = length
        elif status == 206 and have:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                self.part.unlink()
                raise _RetryableError(f"HTTP 206 with Content-Range {response.headers.get('Content-Range')!r} for a "
                             f"request from byte {have}; starting again")
            total = None if match.group(3) == "*" else int(match.group(3))
        elif status == 416:
            self.part.unlink()
            raise _RetryableError("HTTP 416 for the resumed range; starting again")
        elif status in _RETRYABLE_STATUS:
            raise _RetryableError(f"HTTP {status} {response.reason or ''}".rstrip())
        else:
            raise FetchError(f"{self.url}: HTTP {status} {response.reason or ''}".rstrip())
        if total is not None:
            if self.size is not None and total != self.size:
                raise FetchError(f"{self.url}: the server says the file is {total} bytes (Content-Length), the "
                                 f"update announced {self.size}: refusing it")
            if total > self.limits.max_bytes:
                raise FetchError(f"{self.url}: {total} bytes, more than the {self.limits.max_bytes} allowed "
                                 "(models.max_bundle_mb)")
            self.total = total
        needed = (self.total or 0) - self.have
        free = shutil.disk_usage(self.part.parent).free
        if free - needed < self.limits.keep_free_bytes:
            raise FetchError(f"{self.part.parent}: not enough disk space: {needed} more bytes needed, "
                             f"{free} free, {self.limits.keep_free_bytes} kept free (models.keep_free_mb)")
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        self.validator = validator if validator and not validator.startswith("W/") else None
        return total

    def _receive(self, response: urllib3.BaseHTTPResponse, total: int | None) -> bool:
        # The most this download may hold: the announced size, the server's size, the cap, the free space.
        free = shutil.disk_usage(self.part.parent).free - self.limits.keep_free_bytes + self.have
        bounds = [bound for bound in (self.size, self.total, self.limits.max_bytes, free) if bound is not None]
        limit = min(bounds)
        have = self.have
        self._report(force=True)
        with self.part.open("ab") as out:
            try:
                for chunk in response.stream(_CHUNK, decode_content=False):
                    if have + len(chunk) > limit:
                        raise FetchError(f"{self.url}: the server sent more than {limit} bytes "
                                         f"({self._limit_name(limit)}): refusing it")
                    out.write(chunk)
                    have += len(chunk)
                    self._report()
                    if time.monotonic() > self.deadline:
                        raise FetchError(f"{self.url}: not complete within {self.limits.deadline_s:.0f} s "
                                         f"({have} of {self._total_text()} bytes)")
            finally:
                out.flush()
        expected = self.total if self.total is not None else total
        if expected is not None and have < expected:
            raise _RetryableError(f"the connection ended after {have} of {expected} bytes")
        if expected is None:
            self.total = have  # no length given: the end of the body is the end of the file
        return True

    def _limit_name(self, limit: int) -> str:
        if limit == self.size:
            return "the announced size"
        if limit == self.total:
            return "its own Content-Length"
        if limit == self.limits.max_bytes:
            return "models.max_bundle_mb"
        return "the free disk space above models.keep_free_mb"

    def _report(self, *, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if force or now - self.last_progress >= self.limits.progress_interval_s:
            self.last_progress = now
            self.on_progress(self.have, self.total)

    def _check_digest(self) -> None:
        have = self.have
        if self.size is not None and have != self.size:
            self.part.unlink()
            raise FetchError(f"{self.url}: got {have} bytes, the update announced {self.size}")
        if self.sha256 is None:
            return
        digest = hashlib.sha256()
        with self.part.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                digest.update(chunk)
        if digest.hexdigest() != self.sha256:
            self.part.unlink()
            raise FetchError(f"{self.url}: sha256 {digest.hexdigest()} is not the announced {self.sha256}")


def _int_header(response: urllib3.BaseHTTPResponse, name: str) -> int | None:
    value = response.headers.get(name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise FetchError(f"{name}: {value!r} is not a byte count")
    return int(value)


def _describe(exc: urllib3.exceptions.HTTPError) -> str:
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason if isinstance(exc.reason, urllib3.exceptions.HTTPError) else exc
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "timed out waiting for data (models.read_timeout_s)"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before its base class, ConnectTimeoutError
        return f"cannot connect: {exc}"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return "timed out connecting (models.connect_timeout_s)"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return f"connection broken: {exc.args[0] if exc.args else exc}"
    return f"{type(exc).__name__}: {exc}"
