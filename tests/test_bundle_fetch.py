"""Downloads against a real local HTTP server whose handlers truncate, lie, stall, fail and drop."""

from __future__ import annotations

import hashlib
import itertools
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.bundle.errors import FetchError
from agent.bundle.fetch import Limits, fetch
from tests.bundles import MODEL

PAYLOAD = MODEL.read_bytes()  # a real 3.3 MB file
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FAST = Limits(connect_timeout_s=2.0, read_timeout_s=0.4, deadline_s=20.0, attempts=3, backoff_s=0.01,
              keep_free_bytes=0, progress_interval_s=0.0)


@dataclass
class Server:
    url: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    release: threading.Event = field(default_factory=threading.Event)  # ends every stall


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        state = self.server_state
        state.requests.append((self.path, self.headers.get("Range")))
        count = sum(1 for path, _ in state.requests if path == self.path)
        behaviour = self.path.strip("/")
        if behaviour == "missing":
            return self.simple(404, b"not found")
        if behaviour == "broken" or (behaviour == "busy-once" and count == 1):
            return self.simple(500 if behaviour == "broken" else 503, b"try later")
        if behaviour == "drop-once" and count == 1:
            return self.partial_then(len(PAYLOAD) // 2, "close")
        if behaviour == "stall-once" and count == 1:
            return self.partial_then(len(PAYLOAD) // 3, "stall")
        if behaviour == "stall":
            return self.partial_then(1000, "stall")
        if behaviour == "no-range":  # ignores Range; drops the first time
            return self.partial_then(len(PAYLOAD) // 2, "close") if count == 1 else self.full(ranges=False)
        if behaviour == "claims-longer":  # Content-Length 100 more than it has, then closes
            return self.lying(len(PAYLOAD) + 100, PAYLOAD)
        if behaviour == "claims-shorter":  # Content-Length 100 less: the last 100 bytes never arrive
            return self.lying(len(PAYLOAD) - 100, PAYLOAD)
        if behaviour == "endless":  # no Content-Length; more bytes than anyone announced
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for _ in range(8):
                self.wfile.write(PAYLOAD[: 1024 * 1024])
            return None
        return self.full(ranges=True)

    def simple(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def full(self, *, ranges: bool) -> None:
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if ranges and match and (self.headers.get("If-Range") in (None, '"v1"')):
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.send_header("ETag", '"v1"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(PAYLOAD[start:])

    def partial_then(self, count: int, then: str) -> None:
        """Announce the whole file, send ``count`` bytes, then drop the connection or go silent."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        self.wfile.write(PAYLOAD[:count])
        self.wfile.flush()
        if then == "stall":
            self.server_state.release.wait(10)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def lying(self, length: int, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body[:length])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client cuts connections on purpose (a refused download); no tracebacks


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    state = Server(f"http://127.0.0.1:{httpd.server_address[1]}")
    Handler.server_state = state
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), name="http", daemon=True)
    thread.start()
    yield state
    state.release.set()
    httpd.shutdown()
    httpd.server_close()


def download(server: Server, path: str, tmp_path: Path, **kwargs: object) -> Path:
    kwargs.setdefault("limits", FAST)
    return fetch(f"{server.url}/{path}", tmp_path / "bundle.tar", **kwargs)  # type: ignore[arg-type]


def refused(server: Server, path: str, tmp_path: Path, **kwargs: object) -> str:
    with pytest.raises(FetchError) as caught:
        download(server, path, tmp_path, **kwargs)
    return str(caught.value)


def test_a_download_with_progress_and_checks(server: Server, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    path = download(server, "ok", tmp_path, sha256=SHA256, size=len(PAYLOAD),
                    on_progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "bundle.tar.part").exists()
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen)) and len(seen) > 3


def test_resume_after_a_dropped_connection(server: Server, tmp_path: Path) -> None:
    path = download(server, "drop-once", tmp_path, sha256=SHA256, size=len(PAYLOAD))
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/drop-once", None), ("/drop-once", f"bytes={len(PAYLOAD) // 2}-")]


def test_resume_after_a_stall(server: Server, tmp_path: Path) -> None:
    started = time.monotonic()
    assert download(server, "stall-once", tmp_path, sha256=SHA256).read_bytes() == PAYLOAD
    resumed_from = int(re.fullmatch(r"bytes=(\d+)-", server.requests[1][1] or "").group(1))  # type: ignore[union-attr]
    assert 0 < resumed_from <= len(PAYLOAD) // 3  # what arrived before the stall was kept
    assert time.monotonic() - started < 5


def test_a_server_that_ignores_ranges_is_downloaded_again_from_the_start(server: Server, tmp_path: Path) -> None:
    assert download(server, "no-range", tmp_path, sha256=SHA256).read_bytes() == PAYLOAD
    assert server.requests[1][1] == f"bytes={len(PAYLOAD) // 2}-"  # asked to resume, got the whole file


def test_a_partial_download_from_an_earlier_run_resumes_when_the_digest_is_known(server: Server,
                                                                                  tmp_path: Path) -> None:
    (tmp_path / "bundle.tar.part").write_bytes(PAYLOAD[:1000])
    assert download(server, "ok", tmp_path, sha256=SHA256).read_bytes() == PAYLOAD
    assert server.requests == [("/ok", "bytes=1000-")]
    (tmp_path / "bundle.tar.part").write_bytes(b"x" * 1000)  # unverifiable without a digest: start over
    (tmp_path / "bundle.tar").unlink()
    assert download(server, "ok", tmp_path).read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/ok", None)


def test_content_length_longer_than_announced_is_refused_at_the_headers(server: Server, tmp_path: Path) -> None:
    message = refused(server, "claims-longer", tmp_path, size=len(PAYLOAD))
    assert f"the server says the file is {len(PAYLOAD) + 100} bytes (Content-Length)" in message
    assert f"announced {len(PAYLOAD)}" in message and len(server.requests) == 1


def test_content_length_shorter_than_announced_is_refused_at_the_headers(server: Server, tmp_path: Path) -> None:
    message = refused(server, "claims-shorter", tmp_path, size=len(PAYLOAD))
    assert f"the server says the file is {len(PAYLOAD) - 100} bytes" in message


def test_a_content_length_that_is_never_delivered_gives_up_with_the_counts(server: Server, tmp_path: Path) -> None:
    message = refused(server, "claims-longer", tmp_path, sha256=SHA256)
    assert "gave up after 3 attempts without progress" in message
    assert f"{len(PAYLOAD)} of {len(PAYLOAD) + 100} bytes" in message


def test_a_short_content_length_without_an_announced_size_fails_the_digest(server: Server, tmp_path: Path) -> None:
    message = refused(server, "claims-shorter", tmp_path, sha256=SHA256)
    assert f"is not the announced {SHA256}" in message
    assert not (tmp_path / "bundle.tar.part").exists() and not (tmp_path / "bundle.tar").exists()


def test_more_bytes_than_announced_are_cut_off(server: Server, tmp_path: Path) -> None:
    message = refused(server, "endless", tmp_path, size=len(PAYLOAD))
    assert f"sent more than {len(PAYLOAD)} bytes (the announced size)" in message
    message = refused(server, "endless", tmp_path, limits=Limits(**{**FAST.__dict__, "max_bytes": 2_000_000}))
    assert "sent more than 2000000 bytes (models.max_bundle_mb)" in message


def test_an_announced_size_over_the_cap_is_refused_before_connecting(server: Server, tmp_path: Path) -> None:
    message = refused(server, "ok", tmp_path, size=10**9)
    assert "more than the 268435456 allowed (models.max_bundle_mb)" in message and server.requests == []


def test_a_server_that_stalls_times_out(server: Server, tmp_path: Path) -> None:
    started = time.monotonic()
    message = refused(server, "stall", tmp_path)
    assert "timed out waiting for data (models.read_timeout_s)" in message
    assert time.monotonic() - started < 5


def test_the_deadline_bounds_the_whole_download(server: Server, tmp_path: Path) -> None:
    limits = Limits(**{**FAST.__dict__, "deadline_s": 0.6, "attempts": 100})
    started = time.monotonic()
    assert "not complete within 1 s" in refused(server, "stall", tmp_path, limits=limits)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(("path", "status", "requests"), [("missing", "HTTP 404", 1), ("broken", "HTTP 500", 3)])
def test_http_errors(server: Server, tmp_path: Path, path: str, status: str, requests: int) -> None:
    assert status in refused(server, path, tmp_path)
    assert len(server.requests) == requests  # 404 is final; 500 is retried up to the attempts


def test_a_busy_server_is_retried(server: Server, tmp_path: Path) -> None:
    assert download(server, "busy-once", tmp_path, sha256=SHA256).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_nothing_listening(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError, match="cannot connect"):
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "b.tar", limits=FAST)


def test_not_enough_disk_space(server: Server, tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    limits = Limits(**{**FAST.__dict__, "keep_free_bytes": free - len(PAYLOAD) // 2})
    message = refused(server, "ok", tmp_path, limits=limits)
    assert "not enough disk space" in message and "models.keep_free_mb" in message
    assert not (tmp_path / "bundle.tar.part").exists()  # refused before writing a byte


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="only http:// and https://"):
        fetch("file:///etc/passwd", tmp_path / "b.tar")
    with pytest.raises(FetchError, match="not 64 lowercase hex"):
        fetch("http://127.0.0.1/x", tmp_path / "b.tar", sha256="abc")
