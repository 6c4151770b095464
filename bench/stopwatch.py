"""An external stopwatch on the simulator link: a TCP relay that timestamps every frame and every control.

It sits between a simulator and the loop under test (the loop connects to the relay, the relay to the
simulator) in a process of its own, and takes the kernel's receive timestamp of each chunk it relays
(``SO_TIMESTAMPNS``, CLOCK_REALTIME at the socket), so the figures do not depend on the loop's own clock, its
GIL or its logging. A frame is a ``telemetry`` message from the simulator; a control is a ``control`` message
from the loop. ``analyse`` turns the two timestamp lists into the figures the drive loop is judged by:

- period error: |interval between consecutive controls - the nominal period|;
- frame-to-control latency: each control's time minus the newest frame relayed before it;
- controls without a new frame: controls with no frame relayed since the previous control.

With ``--jitter-ms J`` it also plays a camera with jitter: each chunk from the simulator is forwarded after a
random delay of 0 to 2J ms (order kept), while its timestamp stays the moment it arrived, so latency counts the
delay as a camera's late delivery would.

    python bench/stopwatch.py --listen 9191 --upstream 127.0.0.1:9091 --out times.json   # stand-alone
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import signal
import socket
import struct
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
TELEMETRY = (b'"msg_type":"telemetry"', b'"msg_type": "telemetry"')
CONTROL = (b'"msg_type":"control"', b'"msg_type": "control"')
CHUNK = 256 * 1024


def receive(sock: socket.socket) -> tuple[bytes, float]:
    """A chunk and its kernel receive timestamp (s, CLOCK_REALTIME); the wall clock if the kernel gave none."""
    data, ancillary, _, _ = sock.recvmsg(CHUNK, socket.CMSG_SPACE(16))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(payload) >= 16:
            seconds, nanoseconds = struct.unpack("qq", payload[:16])
            return data, seconds + nanoseconds * 1e-9
    return data, time.time()


def count(chunk: bytes, markers: tuple[bytes, ...]) -> int:
    return sum(chunk.count(marker) for marker in markers)


class Relay:
    """One loop connection relayed to the simulator; every message's kernel time recorded."""

    def __init__(self, client: socket.socket, upstream: tuple[str, int], jitter: float = 0.0) -> None:
        self.client = client
        self.jitter = jitter  # s: frames leave 0..2*jitter after they came
        self.held: deque[tuple[float, bytes]] = deque()  # (release time, chunk), in order
        self._rng = random.Random(1)
        self.server = socket.create_connection(upstream)
        for sock in (self.client, self.server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.frames: list[float] = []
        self.controls: list[float] = []
        self._carry = {self.client: b"", self.server: b""}  # a marker split across chunks is still counted once

    def pump(self, sock: socket.socket) -> bool:
        data, stamp = receive(sock)
        if not data:
            return False
        other = self.server if sock is self.client else self.client
        if self.jitter and sock is self.server:
            release = time.monotonic() + self._rng.uniform(0.0, 2 * self.jitter)
            self.held.append((max(release, self.held[-1][0]) if self.held else release, data))
            self.flush()
        else:
            other.sendall(data)
        window = self._carry[sock] + data
        markers = CONTROL if sock is self.client else TELEMETRY
        found = count(window, markers) - count(self._carry[sock], markers)
        (self.controls if sock is self.client else self.frames).extend([stamp] * found)
        self._carry[sock] = window[-32:]
        return True

    def flush(self) -> float | None:
        """Forward the held chunks that are due; the time until the next one (None: none held)."""
        now = time.monotonic()
        while self.held and self.held[0][0] <= now:
            self.client.sendall(self.held.popleft()[1])
        return self.held[0][0] - now if self.held else None

    def close(self) -> None:
        self.held.clear()
        for sock in (self.client, self.server):
            sock.close()


def serve(listen: int, upstream: tuple[str, int], out: Path, ready: Any = None, jitter: float = 0.0) -> None:
    """Relay until SIGTERM, then write every connection's frame and control times to ``out``."""
    listener = socket.create_server(("127.0.0.1", listen))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    relays: list[Relay] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    if ready is not None:
        ready.set()
    while not stopping:
        waits = [w for w in (relay.flush() for relay in relays if relay.held) if w is not None]
        for key, _ in selector.select(max(0.0, min([0.2, *waits]))):
            sock = key.fileobj
            if sock is listener:
                client, _ = listener.accept()
                relay = Relay(client, upstream, jitter)
                relays.append(relay)
                selector.register(relay.client, selectors.EVENT_READ, relay)
                selector.register(relay.server, selectors.EVENT_READ, relay)
                continue
            relay = key.data
            try:
                alive = relay.pump(sock)
            except OSError:
                alive = False
            if not alive:
                for end in (relay.client, relay.server):
                    selector.unregister(end)
                relay.close()
    out.write_text(json.dumps([{"frames": r.frames, "controls": r.controls} for r in relays]))


def analyse(frames: list[float], controls: list[float], period: float, skip: int = 20) -> dict[str, Any]:
    """External figures for one connection (the first ``skip`` controls are warm-up)."""
    f = np.asarray(frames, dtype=np.float64)
    c = np.asarray(controls, dtype=np.float64)[skip:]
    if len(c) < 3 or len(f) == 0:
        return {"controls": len(c)}
    newest = np.searchsorted(f, c, side="right") - 1  # index of the newest frame relayed before each control
    valid = newest >= 0
    latency = (c[valid] - f[newest[valid]]) * 1e3
    errors = np.abs(np.diff(c) - period) * 1e3
    repeated = int(np.sum(np.diff(newest) == 0))  # no frame relayed since the previous control

    def stats(values: np.ndarray) -> dict[str, float]:
        return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3),
                "max": round(float(values.max()), 3)}

    return {"controls": len(c), "frames": len(f), "period_error_ms": stats(errors),
            "latency_ms": stats(latency), "controls_without_new_frame": repeated,
            "period_error_samples_ms": [round(float(e), 3) for e in errors[:: max(1, len(errors) // 400)]],
            "latency_samples_ms": [round(float(x), 3) for x in latency[:: max(1, len(latency) // 400)]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the simulator")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="delay frames by 0..2x this (a jittery camera)")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    serve(args.listen, (host, int(port)), args.out, jitter=args.jitter_ms / 1000.0)


if __name__ == "__main__":
    main()
