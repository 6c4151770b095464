"""The twin as a process, and peers that try to spoil it for the others (tests and bench/twin_isolation.py).

``TwinProcess`` runs the real ``donkey-sim serve``, drains its log on a thread (a full pipe
would stall the twin's logging, and so the twin), and reads its resident memory from /proc.

``HostilePeers`` are plain sockets on threads, one of each kind the twin must contain:
- ``flooder``: asks ``node_position`` and sends controls as fast as it can, never reads;
- ``big_camera``: asks for a 1920x1080 PNG camera and reads every frame;
- ``idle``: 200 connections that never send or read anything;
- ``scene_flood``: sends ``load_scene`` as fast as it can (cycling through the scenes), reading.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from simulator.scenes import scene_names

SIM = [sys.executable, "-m", "simulator"]
KINDS = ("flooder", "big_camera", "scene_flood", "idle")  # idle last: its connections fill the twin's limit



def received(sock: socket.socket, stopping: threading.Event, chunk: int = 1 << 20) -> Iterator[bytes]:
    """What a socket receives, chunk by chunk, until ``stopping`` is set or the peer closes (a reader's loop)."""
    sock.settimeout(0.5)
    while not stopping.is_set():
        try:
            data = sock.recv(chunk)
        except TimeoutError:
            continue
        except OSError:
            return
        if not data:
            return
        yield data

class TwinProcess:
    """``donkey-sim serve`` with its log kept in memory and its summary read at the end."""

    def __init__(self, *args: str, summary: Path, timeout: float = 30.0) -> None:
        self.summary_path = summary
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen([*SIM, "serve", "--port", "0", "--summary", str(summary), *args],
                                        stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        match = self.wait_for(r"donkey-sim: listening on [\d.]+:(\d+)", timeout)
        if match is None:
            self.process.kill()
            raise AssertionError("the twin did not start:\n" + "\n".join(self.lines[-20:]))
        self.port = int(match.group(1))
        self.peak_rss_mb = 0.0

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str] | None:
        """The first log line from ``start`` on matching ``pattern``, waiting up to ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    found = regex.search(line)
                    if found:
                        return found
                start = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    return None
                self._changed.wait(min(remaining, 0.5))

    def rss_mb(self) -> float:
        """Resident memory now (and the peak seen so far is kept), MB."""
        with contextlib.suppress(OSError, StopIteration, ValueError):
            status = Path(f"/proc/{self.process.pid}/status").read_text()
            kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
            self.peak_rss_mb = max(self.peak_rss_mb, kb / 1024)
            return kb / 1024
        return 0.0

    def stop(self) -> dict[str, Any]:
        """SIGTERM, and the summary it writes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        result: dict[str, Any] = json.loads(self.summary_path.read_text())
        return result


class HostilePeers:
    """One peer of each given kind, on threads, until ``stop()``."""

    def __init__(self, port: int, kinds: tuple[str, ...] = KINDS, idle_connections: int = 200) -> None:
        self.port = port
        self.kinds = kinds
        self.idle_connections = idle_connections
        self.sockets: list[socket.socket] = []
        self.stopping = threading.Event()
        self.sent = {kind: 0 for kind in kinds}
        self.received = {kind: 0 for kind in kinds}
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> HostilePeers:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> HostilePeers:
        """Connect every peer (in ``kinds`` order, so the idle ones come last), then let them loose."""
        connected = [(kind, self._connect()) for kind in self.kinds if kind != "idle"]
        if "idle" in self.kinds:
            self._open_idle()
        for kind, sock in connected:
            thread = threading.Thread(target=getattr(self, f"_{kind}"), args=(sock,), name=f"hostile-{kind}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self.stopping.set()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sockets.append(sock)
        return sock

    def _open_idle(self) -> None:
        for _ in range(self.idle_connections):
            with contextlib.suppress(OSError):
                self._connect()

    def _read_all(self, sock: socket.socket, kind: str) -> None:
        """Read and discard until stopped (a reader thread for the kinds that read)."""
        for data in received(sock, self.stopping):
            self.received[kind] += len(data)

    def _flooder(self, sock: socket.socket) -> None:
        requests = b"".join(json.dumps(m).encode() for m in (
            {"msg_type": "node_position", "index": "12"},
            {"msg_type": "control", "steering": "0.1", "throttle": "0.2", "brake": "0"},
        )) * 100
        while not self.stopping.is_set():
            try:
                sock.sendall(requests)  # blocks while the twin reads this peer slowly: that is the point
            except OSError:
                return
            self.sent["flooder"] += 200

    def _big_camera(self, sock: socket.socket) -> None:
        sock.sendall(json.dumps({"msg_type": "cam_config", "img_w": "1920", "img_h": "1080", "img_d": "3",
                                 "img_enc": "PNG", "fov": "0", "offset_x": "0", "offset_y": "0", "offset_z": "0",
                                 "rot_x": "0"}).encode())
        self.sent["big_camera"] += 1
        self._read_all(sock, "big_camera")

    def _scene_flood(self, sock: socket.socket) -> None:
        threading.Thread(target=self._read_all, args=(sock, "scene_flood"), daemon=True).start()
        names = scene_names()
        while not self.stopping.is_set():
            name = names[self.sent["scene_flood"] % len(names)]
            try:
                sock.sendall(json.dumps({"msg_type": "load_scene", "scene_name": name}).encode())
            except OSError:
                return
            self.sent["scene_flood"] += 1
            time.sleep(0.001)
