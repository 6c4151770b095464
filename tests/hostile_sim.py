"""A real TCP Donkey simulator for tests that can be told to misbehave, on purpose, at runtime.

It speaks the protocol as the twin does (handshake path A by default: ``scene_selection_ready``
-> ``get_scene_names`` -> ``scene_names`` -> ``load_scene`` -> ``car_loaded``; path B with
``menu=False``), then streams newline-terminated telemetry at 20 Hz with real JPEG frames of
the size asked for in ``cam_config``, rendered by ``simulator.world.TwinCar``: the shipped
autopilot sees a real-looking road, and the car moves with the controls it receives. Every
control message is recorded with ``time.monotonic()`` at receipt, per connection.

Misbehaviours (``misbehave(kind, seconds=..., count=...)``), each replacing or preceding
the good telemetry of a tick, for a duration or a number of ticks:

- ``nested``: a telemetry message holding 100,000 nested ``[``
- ``wrong_types``: ``"accel_x": "abc"``, ``"image": 42``, ``"speed": [1]`` in turn
- ``no_image``: telemetry without ``image``
- ``huge``: a telemetry message of several MB (``HUGE_BYTES``)
- ``cutoff``: the first half of a telemetry message (no newline), then a good one
- ``random``: 1 MB of random bytes, then a good message
- ``bomb``: a 20000 x 20000 PNG of zeros as the image (tens of KB on the wire)
- ``big_image``: a 6000 x 6000 PNG of zeros (under Pillow's own bomb limit)
- ``silence``: no telemetry
- ``deaf``: stop reading the sockets (telemetry goes on)

and two actions: ``close`` (every connection now; reconnections are accepted as new cars)
and ``restart`` (close everything and stop listening for ``seconds``, then listen again on
the same port, as a restarted twin does).

    with HostileSim() as sim:
        client = SimClient("127.0.0.1", sim.port)
        sim.misbehave("nested", seconds=1.0)
        sim.wait_idle(5.0)
        sim.controls_since(t)
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from agent.hw.donkeysim.framing import JsonObjectSplitter, ProtocolError, encode, get_float
from simulator.render import CameraConfig
from simulator.world import TwinCar

SCENES = ["generated_track", "mountain_track"]
NESTING = 100_000
HUGE_BYTES = 4 * 1024 * 1024
RANDOM_BYTES = 1024 * 1024
TICK_KINDS = ("nested", "wrong_types", "no_image", "huge", "cutoff", "random", "bomb", "big_image", "silence", "deaf")
ACTION_KINDS = ("close", "restart")
GOOD_AFTER_GARBAGE = ("random", "cutoff")  # these ticks end with a good frame


@dataclass(frozen=True)
class Control:
    """One control message as the simulator received it."""

    received: float  # time.monotonic() when it was parsed
    steering: float
    throttle: float
    brake: float
    car: int  # the connection's number, from 1


@dataclass
class Misbehaviour:
    kind: str
    until: float | None  # time.monotonic() when it ends, or None for a count
    remaining: int | None  # ticks left, or None for a duration
    done: threading.Event = field(default_factory=threading.Event)
    sent: int = 0

    def active(self, now: float) -> bool:
        if self.until is not None:
            return now < self.until
        return self.remaining is not None and self.remaining > 0


class Connection:
    """One client: its socket, its car and what it sent."""

    def __init__(self, sim: HostileSim, sock: socket.socket, number: int) -> None:
        self.sim = sim
        self.sock = sock
        self.number = number
        self.peer = sock.getpeername()
        self.controls: list[Control] = []
        self.messages: list[dict[str, Any]] = []
        self.car: TwinCar | None = None
        self.camera = CameraConfig()
        self.frames_sent = 0
        self.closed = threading.Event()
        self._send_lock = threading.Lock()
        self._car_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._read_loop, name=f"hostile-read-{number}", daemon=True),
                         threading.Thread(target=self._tick_loop, name=f"hostile-tick-{number}", daemon=True)]

    def start(self) -> None:
        if self.sim.menu:
            self.send(encode({"msg_type": "scene_selection_ready", "loaded": "1"}))
        else:
            self._spawn(self.sim.track)
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self._send_lock:
            self.sock.close()

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def send(self, data: bytes) -> bool:
        with self._send_lock:
            if self.closed.is_set():
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                pass
        self.close()  # the client is gone or not reading for seconds: as a real simulator would
        return False

    # -- inbound ----------------------------------------------------------------------------
    def _read_loop(self) -> None:
        splitter = JsonObjectSplitter()
        while not self.closed.is_set():
            if self.sim.is_active("deaf"):
                time.sleep(0.01)
                continue
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            for message in splitter.feed(data):
                self._handle(message)
        self.close()

    def _handle(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        kind = message.get("msg_type")
        try:
            if kind == "control":
                self._on_control(message)
            elif kind == "get_scene_names":
                self.send(encode({"msg_type": "scene_names", "scene_names": SCENES}))
            elif kind == "load_scene":
                scene = message.get("scene_name")
                self._spawn(scene if scene in SCENES else self.sim.track)
            elif kind == "cam_config":
                self._on_cam_config(message)
        except ProtocolError:
            pass  # the twin logs these; the tests look at what was recorded

    def _on_control(self, message: dict[str, Any]) -> None:
        control = Control(time.monotonic(), get_float(message, "steering", 0.0), get_float(message, "throttle", 0.0),
                          get_float(message, "brake", 0.0), self.number)
        self.controls.append(control)
        self.sim._record(control)
        with self._car_lock:
            if self.car is not None:
                self.car.set_controls(max(-1.0, min(1.0, control.steering)), max(-1.0, min(1.0, control.throttle)),
                                      max(0.0, min(1.0, control.brake)))

    def _on_cam_config(self, message: dict[str, Any]) -> None:
        width = int(get_float(message, "img_w", 0.0)) or self.camera.width
        height = int(get_float(message, "img_h", 0.0)) or self.camera.height
        with self._car_lock:
            self.camera = self.camera.with_overrides(width=width, height=height)
            if self.car is not None:
                self.car.renderer(self.camera)

    def _spawn(self, scene: str) -> None:
        car = TwinCar(scene, seed=self.sim.seed, camera=self.camera)
        with self._car_lock:
            self.car = car
        self.send(encode({"msg_type": "car_loaded"}))

    # -- outbound ---------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        period = 1.0 / self.sim.fps
        deadline = time.monotonic()
        last: float | None = None
        while not self.closed.is_set():
            deadline += period
            delay = deadline - time.monotonic()
            if delay < 0:  # late (a loaded machine): skip ticks rather than bunch them
                deadline = time.monotonic()
            elif self.closed.wait(delay):
                return
            now = time.monotonic()
            with self._car_lock:
                car = self.car
                if car is None:
                    continue
                car.advance(min(0.25, now - last) if last is not None else period)
                last = now
                good = car.telemetry()
                good["image"] = jpeg_base64(car.render(self.camera))
            payload, finished, carries_good = self.sim._payload(good)
            if payload and self.send(payload):
                self.frames_sent += 1
                if carries_good:  # a good frame went out (alone, or after garbage)
                    self.sim._rendered(now)
            if finished is not None:
                self.sim._end(finished)


class HostileSim:
    """A misbehaving Donkey simulator on a real socket, in background threads."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, fps: float = 20.0, menu: bool = True,
                 track: str = "generated_track", seed: int = 0, rcvbuf: int | None = None) -> None:
        self.host, self.port = host, port
        self.fps = fps
        self.menu = menu
        self.track = track
        self.seed = seed
        self.rcvbuf = rcvbuf
        self.connections: list[Connection] = []
        self.controls: list[Control] = []
        self.sent: dict[str, int] = {}  # misbehaving payloads sent, by kind
        self.good_frames = 0  # good telemetry messages sent, over every connection
        self.good_frame_times: list[float] = []  # when each good frame that went out was rendered
        self._lock = threading.Lock()
        self._mode: Misbehaviour | None = None
        self._listener: socket.socket | None = None
        self._listening = threading.Event()
        self._stop = threading.Event()
        self._accepter: threading.Thread | None = None
        self._numbers = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> HostileSim:
        self._listen()
        self._accepter = threading.Thread(target=self._accept_loop, name="hostile-accept", daemon=True)
        self._accepter.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._unlisten()
        for connection in list(self.connections):
            connection.close()
        for connection in list(self.connections):
            connection.join(2.0)
        if self._accepter is not None:
            self._accepter.join(2.0)

    def __enter__(self) -> HostileSim:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:  # inherited by accepted sockets: a deaf simulator fills up fast
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        listener.bind((self.host, self.port))
        listener.listen(16)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._listening.set()

    def _unlisten(self) -> None:
        self._listening.clear()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None or not self._listening.is_set():
                time.sleep(0.02)
                continue
            try:
                sock, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            sock.settimeout(2.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._numbers += 1
                connection = Connection(self, sock, self._numbers)
                self.connections.append(connection)
            connection.start()

    # -- misbehaving ------------------------------------------------------------------------
    def misbehave(self, kind: str, *, seconds: float | None = None, count: int | None = None) -> None:
        """Start a misbehaviour (a tick kind for ``seconds`` or ``count`` ticks; default one tick), or an action."""
        if kind == "close":
            for connection in self.live_connections():
                connection.close()
            return
        if kind == "restart":
            mode = Misbehaviour("restart", time.monotonic() + (seconds or 1.0), None)
            self._replace(mode)  # now, so that wait_idle() right after this waits for the restart
            threading.Thread(target=self._restart, args=(mode, seconds or 1.0), daemon=True).start()
            return
        if kind not in TICK_KINDS:
            raise ValueError(f"unknown misbehaviour {kind!r}; one of {TICK_KINDS + ACTION_KINDS}")
        if kind in ("bomb", "big_image"):
            bomb_png(*BOMB_SIDES[kind])  # made now, not inside a tick
        until = time.monotonic() + seconds if seconds is not None else None
        remaining = None if seconds is not None else (count or 1)
        self._replace(Misbehaviour(kind, until, remaining))

    def _replace(self, mode: Misbehaviour) -> None:
        """Make ``mode`` current; the one it replaces counts as done."""
        with self._lock:
            previous, self._mode = self._mode, mode
        if previous is not None:
            previous.done.set()

    def _restart(self, mode: Misbehaviour, downtime: float) -> None:
        self._unlisten()
        for connection in self.live_connections():
            connection.close()
        time.sleep(downtime)
        if not self._stop.is_set():
            self._listen()
        self._end(mode)

    def is_active(self, kind: str) -> bool:
        with self._lock:
            mode = self._mode
        if mode is None or mode.kind != kind:
            return False
        if mode.active(time.monotonic()):
            return True
        self._end(mode)
        return False

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the current misbehaviour to end; True if none is running."""
        with self._lock:
            mode = self._mode
        if mode is None:
            return True
        deadline = time.monotonic() + timeout
        while not mode.done.is_set() and time.monotonic() < deadline:
            if mode.until is not None and time.monotonic() >= mode.until and mode.kind != "restart":
                self._end(mode)  # a duration ends even if no tick came to notice it
            mode.done.wait(0.02)
        return mode.done.is_set()

    def _end(self, mode: Misbehaviour) -> None:
        with self._lock:
            if self._mode is mode:
                self._mode = None
        mode.done.set()

    def _payload(self, good: dict[str, Any]) -> tuple[bytes, Misbehaviour | None, bool]:
        """What one tick sends, the misbehaviour to end once it is sent (its last tick), and whether
        the bytes end with a good frame a client can use (``random`` and ``cutoff`` do, after garbage).

        Good telemetry carries ``hostile_frame``, a number that grows with every good frame
        sent: a test that waits for a frame numbered above ``good_frames`` (read after
        ``wait_idle``) knows every bad byte before it was sent and has been read.
        """
        now = time.monotonic()
        with self._lock:
            mode = self._mode
            bad = mode is not None and mode.kind in TICK_KINDS and mode.kind != "deaf" and mode.active(now)
            if mode is not None and bad:
                index = mode.sent
                mode.sent += 1
                if mode.remaining is not None:
                    mode.remaining -= 1
                self.sent[mode.kind] = self.sent.get(mode.kind, 0) + 1
                return (bad_payload(mode.kind, good, index), None if mode.active(now) else mode,
                        mode.kind in GOOD_AFTER_GARBAGE)
            self.good_frames += 1
            good["hostile_frame"] = self.good_frames
        if mode is not None and mode.kind in TICK_KINDS and not mode.active(now):
            self._end(mode)
        return encode(good), None, True

    # -- what the tests look at -------------------------------------------------------------
    def _rendered(self, when: float) -> None:
        with self._lock:
            self.good_frame_times.append(when)

    def newest_good_frame(self, before: float) -> float | None:
        """When the newest good frame sent before ``before`` was rendered (time.monotonic())."""
        with self._lock:
            times = [t for t in self.good_frame_times if t <= before]
        return times[-1] if times else None

    def _record(self, control: Control) -> None:
        with self._lock:
            self.controls.append(control)

    def controls_since(self, since: float, car: int | None = None) -> list[Control]:
        """Controls received at or after ``since`` (time.monotonic()), of one connection or all."""
        with self._lock:
            return [c for c in self.controls if c.received >= since and (car is None or c.car == car)]

    def live_connections(self) -> list[Connection]:
        with self._lock:
            return [c for c in self.connections if not c.closed.is_set()]

    def cars(self) -> int:
        """Cars spawned so far (each connection that loaded a scene)."""
        with self._lock:
            return sum(1 for c in self.connections if c.car is not None)

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


# -- payloads -------------------------------------------------------------------------------------
def jpeg_base64(frame: Any) -> str:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def bad_payload(kind: str, good: dict[str, Any], index: int) -> bytes:
    """The bytes one misbehaving tick sends instead of ``encode(good)``."""
    if kind == "silence":
        return b""
    if kind == "nested":
        line = encode(good)
        return line[:1] + b'"deep":' + b"[" * NESTING + b"]" * NESTING + b"," + line[1:]
    if kind == "wrong_types":
        field_name, value = (("accel_x", "abc"), ("image", 42), ("speed", [1]))[index % 3]
        return encode({**good, field_name: value})
    if kind == "no_image":
        return encode({k: v for k, v in good.items() if k != "image"})
    if kind == "huge":
        return encode({**good, "pad": "x" * HUGE_BYTES})
    if kind == "cutoff":
        line = encode(good)
        return line[: len(line) // 2] + line
    if kind == "random":
        return os.urandom(RANDOM_BYTES) + encode(good)
    if kind in BOMB_SIDES:
        return encode({**good, "image": base64.b64encode(bomb_png(*BOMB_SIDES[kind])).decode("ascii")})
    raise ValueError(kind)


BOMB_SIDES = {"bomb": (20000, 20000), "big_image": (6000, 6000)}


@functools.lru_cache(maxsize=4)
def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG of zeros: ~width*height/8/1000 bytes, width*height*3 bytes once decoded to RGB."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
