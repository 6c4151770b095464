"""sd_notify through the ``sdnotify`` library: readiness, status, start-up time, watchdog, stopping.

Everything is a no-op outside systemd (no NOTIFY_SOCKET), so the same code runs on a terminal.
"""

from __future__ import annotations

import os
from collections import deque

from sdnotify import SystemdNotifier


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = SystemdNotifier() if self.enabled else None
        self.sent: deque[str] = deque(maxlen=256)  # the latest messages sent, for the logs and tests

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)
            self.sent.append(message)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more start-up (or stop) time while something slow is in progress."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when the watchdog is not for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        return max(0.05, int(usec) / 1_000_000 / 2)
    except ValueError:
        return None
