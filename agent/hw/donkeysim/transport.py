"""The client's socket: reaching the simulator, and sends that never block the drive thread for long.

The socket is non-blocking and its send buffer small: a send waits at most its timeout for
room, so a simulator that stops reading is noticed within seconds (the send fails and the
client declares the connection broken) instead of stalling the caller, which is the drive
thread.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import threading
import time

from agent.errors import AgentError

SEND_BUFFER_BYTES = 32 * 1024  # small, so a simulator that stops reading is noticed in seconds
RETRY_INTERVAL = 0.2  # s between connection attempts while the simulator is starting


class SimError(AgentError, ConnectionError):
    """The simulator could not be reached, refused the handshake or went away."""


class SimDisconnectedError(SimError):
    """Nothing was sent: the client is not connected (not yet, no longer, or closed)."""


class SimSendError(SimError):
    """A live connection could not take a send (the simulator is not reading, or the socket failed).

    The connection is closed when this is raised.
    """


def open_socket(host: str, port: int, deadline: float, *, retry: bool, stop: threading.Event) -> socket.socket:
    """Connect by ``deadline`` (``time.monotonic()``), retrying unless told not to; raises SimError.

    ``stop`` ends the retries early (the client was closed meanwhile).
    """
    last_error: OSError | None = None
    while not stop.is_set():  # the simulator may still be starting
        try:
            return socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        except OSError as exc:
            last_error = exc
        if not retry or time.monotonic() + RETRY_INTERVAL >= deadline:
            break
        stop.wait(RETRY_INTERVAL)
    raise SimError(f"cannot reach the simulator at {host}:{port}: {last_error or 'closed'}")


def configure_socket(sock: socket.socket) -> None:
    sock.setblocking(False)  # both threads wait with poll(), each with its own limit
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


def send_within(sock: socket.socket, data: bytes, timeout: float) -> str | None:
    """Write all of ``data`` within ``timeout`` seconds; the reason it failed, or None."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    poller: select.poll | None = None
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            return f"send failed: {exc}"
        if not view:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return f"the simulator is not reading (a send did not complete in {timeout * 1e3:.0f} ms)"
        if poller is None:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
        poller.poll(max(1, math.ceil(remaining * 1000)))
    return None
