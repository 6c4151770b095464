"""A Donkey simulator protocol client: drives our twin and the Unity Donkey simulator alike.

One reader thread owns the socket's inbound side: it splits objects, checks every field it
uses, decodes camera frames and publishes each good telemetry message as an immutable
``Telemetry`` with a sequence number and receive timestamp. Consumers take the newest one
(a single reference assignment, so no lock on the reading side) or wait for the next.
Outbound messages carry numbers as strings, as the Unity simulator requires.

The simulator is not trusted. Whatever it sends, the reader thread neither dies nor
buffers without bound: objects are capped at what the configured camera can produce,
nesting is capped before ``json.loads``, an image is refused from its header unless it has
the configured size (so a decompression bomb is never decoded), and a bad message is
dropped and counted by reason, the first of each kind logged once. Sends never block the
caller (the drive thread) for more than ``send_timeout``: a send that cannot complete in
that time means the simulator is not reading, and the connection is declared broken. When
the reader ends, for any reason, it shuts the socket down, closes it and records why.
Field checks and image decoding are in ``telemetry``; the socket and its bounded sends, in ``transport``.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from typing import Any

from agent.hw.donkeysim import DEFAULT_PORT
from agent.hw.donkeysim.framing import JsonObjectSplitter, encode
from agent.hw.donkeysim.telemetry import (
    IMAGE_FORMATS,
    IMU_FIELDS,
    MESSAGE_HEADROOM,
    NUMBER_FIELDS,
    BadMessageError,
    Telemetry,
    decode_image,
    max_image_b64,
    parse_numbers,
)
from agent.hw.donkeysim.transport import (
    SEND_BUFFER_BYTES,
    SimDisconnectedError,
    SimError,
    SimSendError,
    configure_socket,
    open_socket,
    send_within,
)
from agent.hw.slot import LatestSlot

__all__ = [  # the names this module has always offered, wherever they are defined now
    "DEFAULT_SEND_TIMEOUT", "DEFAULT_SILENCE_TIMEOUT", "IMAGE_FORMATS", "IMU_FIELDS", "MESSAGE_HEADROOM",
    "NUMBER_FIELDS", "POLL_MS", "RECV_BYTES", "SEND_BUFFER_BYTES", "BadMessageError", "SimClient",
    "SimDisconnectedError", "SimError", "SimSendError", "Telemetry", "decode_image", "max_image_b64", "parse_numbers",
]

log = logging.getLogger(__name__)

RECV_BYTES = 64 * 1024  # per read: scanning one read holds the GIL well under a millisecond
DEFAULT_SEND_TIMEOUT = 0.005  # s a send may wait for room in the socket buffer
DEFAULT_SILENCE_TIMEOUT = 5.0  # s without a byte from a simulator that has loaded our car
POLL_MS = 250  # how often the reader looks at the clock while nothing arrives


class SimClient:
    """Connects one car to a simulator; ``connect()`` returns once the car is loaded.

    A client is one connection: after a disconnect, make a new one (``TwinLink`` does).
    ``slot`` lets an owner that outlives clients receive the telemetry (the client then
    never closes it), and ``seq_start`` continues its sequence numbers.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        scene: str = "generated_track",
        camera: dict[str, Any] | None = None,
        camera_b: dict[str, Any] | None = None,
        car_name: str = "donkey-agent",
        connect_timeout: float = 15.0,
        retry_connect: bool = True,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        silence_timeout: float | None = DEFAULT_SILENCE_TIMEOUT,
        max_inbound_bytes: int | None = None,
        slot: LatestSlot[Telemetry] | None = None,
        seq_start: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.scene = scene
        self.camera = {"img_w": 160, "img_h": 120, "img_d": 3, "img_enc": "JPG", **(camera or {})}
        self.camera_b = None if camera_b is None else {"img_w": 160, "img_h": 120, "img_d": 3, "img_enc": "JPG",
                                                       **camera_b}
        self.image_size = (int(self.camera["img_w"]), int(self.camera["img_h"]))
        self.image_b_size = None if self.camera_b is None else (int(self.camera_b["img_w"]),
                                                                int(self.camera_b["img_h"]))
        self.car_name = car_name
        self.connect_timeout = connect_timeout
        self.retry_connect = retry_connect
        self.send_timeout = send_timeout
        self.silence_timeout = silence_timeout
        self.max_inbound_bytes = max_inbound_bytes or self._inbound_cap()
        self._splitter = JsonObjectSplitter(self.max_inbound_bytes, newline_terminated=True)
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()  # control and handshake replies come from two threads
        self._owns_slot = slot is None
        self._telemetry: LatestSlot[Telemetry] = LatestSlot() if slot is None else slot
        self._seq = seq_start
        self._chunk_received = 0.0  # monotonic time of the latest chunk read from the socket
        self._loaded = threading.Event()
        self._settled = threading.Event()  # loaded, or down: what connect() waits for
        self._down = threading.Event()  # no longer usable: sends are refused from now on
        self._ended = threading.Event()  # down, the socket closed and the reason final
        self._closing = threading.Event()  # close() was called
        self._stats_lock = threading.Lock()
        self._bad: dict[str, int] = {}
        self._warned: set[str] = set()
        self.scene_names: list[str] = []
        self.line_crossings = 0  # collision_with_starting_line messages received (the first starts the timing)
        self.frames = 0  # telemetry messages published
        self.frames_without_image = 0  # telemetry messages that carried no valid image: no frame
        self.disconnect_reason: str | None = None

    def _inbound_cap(self) -> int:
        cap = MESSAGE_HEADROOM + max_image_b64(*self.image_size)
        if self.image_b_size is not None:
            cap += 2 * max_image_b64(*self.image_b_size)  # the twin sends camera B twice (imageb, image_b)
        return cap

    @property
    def laps(self) -> int:
        """Laps completed, as gym-donkeycar counts them: crossings after the first."""
        return max(0, self.line_crossings - 1)

    # -- lifecycle -----------------------------------------------------------------------
    def connect(self) -> SimClient:
        """Open the connection and wait for ``car_loaded``; raises SimError (and cleans up) otherwise."""
        if self._sock is not None or self._closing.is_set():
            raise SimDisconnectedError("a SimClient connects once; make a new one")
        deadline = time.monotonic() + self.connect_timeout
        sock = open_socket(self.host, self.port, deadline, retry=self.retry_connect, stop=self._closing)
        configure_socket(sock)
        self._sock = sock
        self._reader = threading.Thread(target=self._read_loop, args=(sock,), name="sim-client-reader", daemon=True)
        self._reader.start()
        self._settled.wait(max(0.0, deadline - time.monotonic()))
        if not self._loaded.is_set() or self._down.is_set():
            reason = self.disconnect_reason or f"no car_loaded within {self.connect_timeout:g} s"
            self.close()
            raise SimError(f"simulator at {self.host}:{self.port} did not load a car: {reason}")
        try:
            self.send({"msg_type": "car_config", "body_style": "donkey", "body_r": "220", "body_g": "120",
                       "body_b": "40", "car_name": self.car_name, "font_size": "50"})
            self.send({"msg_type": "cam_config", **{k: str(v) for k, v in self.camera.items()}})
            if self.camera_b is not None:
                self.send({"msg_type": "cam_config_b", **{k: str(v) for k, v in self.camera_b.items()}})
        except SimError:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the car (zero throttle, brake) and disconnect; idempotent, never raises."""
        if self._closing.is_set():
            return
        if self.connected:
            with contextlib.suppress(SimError):
                self.send_control(0.0, 0.0, 1.0)
        self._closing.set()
        self._shutdown()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(2.0)
        if reader is None or not reader.is_alive():
            self._disconnect("closed by the agent")  # no-op when the reader already did it

    def __enter__(self) -> SimClient:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._loaded.is_set() and not self._down.is_set()

    def wait_disconnected(self, timeout: float | None = None) -> bool:
        """Wait until the connection is over (for any reason) and its socket closed; True if it is."""
        return self._ended.wait(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reader thread to end: after that, nothing more is published."""
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def _shutdown(self) -> None:
        """Wake the reader: it sees the end of the stream, closes the socket and records why."""
        with self._send_lock:  # serialised with the close in _disconnect: never a reused descriptor
            sock = self._sock
            if sock is not None and sock.fileno() != -1:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _fail(self, reason: str) -> None:
        """The connection is broken (seen from a send): refuse sends from now on, wake the reader."""
        with self._stats_lock:
            if self.disconnect_reason is None:
                self.disconnect_reason = reason
        self._down.set()
        self._settled.set()
        self._shutdown()

    def _disconnect(self, reason: str) -> None:
        """The end of the connection: record why (the first reason wins), close the socket, wake waiters."""
        with self._stats_lock:
            first = self.disconnect_reason is None
            if first:
                self.disconnect_reason = "closed by the agent" if self._closing.is_set() else reason
        with self._send_lock:  # never close the socket under a send in progress
            sock = self._sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._down.set()  # under the lock: a send sees an open socket, or this
        self._settled.set()
        if self._owns_slot:
            self._telemetry.close()
        self._ended.set()
        if first and not self._closing.is_set():
            log.warning("simulator %s:%s: disconnected: %s", self.host, self.port, self.disconnect_reason)

    # -- outbound --------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        """Send one message; waits at most ``send_timeout`` for socket buffer space.

        Raises SimDisconnectedError when not connected (nothing sent) and SimSendError when the
        connection could not take the message (it is then closed).
        """
        data = encode(message)
        with self._send_lock:
            sock = self._sock
            if sock is None or self._down.is_set() or self._closing.is_set():
                raise SimDisconnectedError(f"not connected to the simulator: {self.disconnect_reason or 'not open'}")
            failure = send_within(sock, data, self.send_timeout)
        if failure is not None:
            self._fail(failure)
            raise SimSendError(failure)

    def send_control(self, steering: float, throttle: float, brake: float = 0.0) -> None:
        self.send({"msg_type": "control", "steering": f"{steering:.6f}", "throttle": f"{throttle:.6f}",
                   "brake": f"{brake:.6f}"})

    def reset_car(self) -> None:
        self.send({"msg_type": "reset_car"})

    # -- inbound ---------------------------------------------------------------------------
    @property
    def latest(self) -> Telemetry | None:
        return self._telemetry.latest

    def wait_next(self, after_seq: int, timeout: float) -> Telemetry | None:
        """The first telemetry newer than ``after_seq``, or None on timeout or disconnect."""
        return self._telemetry.read(after_seq, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters for status reports: what arrived, what was dropped and why."""
        with self._stats_lock:
            bad = dict(self._bad)
        return {
            "connected": self.connected,
            "disconnect_reason": self.disconnect_reason,
            "frames": self.frames,
            "frames_without_image": self.frames_without_image,
            "bad_messages": bad,
            "framing": self._splitter.stats.as_dict(),
            "laps": self.laps,
            "line_crossings": self.line_crossings,
        }

    @property
    def bad_messages(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self._bad)

    def _read_loop(self, sock: socket.socket) -> None:
        reason = "the reader stopped"
        try:
            reason = self._pump(sock)
        except BaseException as exc:  # the reader must always close the socket and say why
            reason = f"reader failed: {type(exc).__name__}: {exc}"
            log.exception("simulator %s:%s: reader failed", self.host, self.port)
        finally:
            self._disconnect(reason)

    def _pump(self, sock: socket.socket) -> str:
        """Read and dispatch until the stream ends; returns why it ended."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        last_data = time.monotonic()
        while not self._closing.is_set() and not self._down.is_set():
            ready = poller.poll(POLL_MS)
            now = time.monotonic()
            if not ready:
                if self.silence_timeout is not None and self._loaded.is_set() \
                        and now - last_data > self.silence_timeout:
                    return f"no data from the simulator for {self.silence_timeout:g} s"
                continue
            try:
                data = sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                return f"connection error: {exc}"
            if not data:
                return "the simulator closed the connection"
            last_data = self._chunk_received = time.monotonic()  # a frame's time: its bytes, not its decoding
            self._feed(data)
        return self.disconnect_reason or "closed by the agent"

    def _feed(self, data: bytes) -> None:
        stats = self._splitter.stats
        before = (stats.malformed, stats.oversized, stats.too_deep, stats.resyncs)
        messages = self._splitter.feed(data)
        after = (stats.malformed, stats.oversized, stats.too_deep, stats.resyncs)
        for kind, old, new in zip(("malformed", "oversized", "too_deep", "resync"), before, after, strict=True):
            if new > old:
                self._warn_once(kind, f"{new - old} object(s) dropped by the framing "
                                      f"(cap {self.max_inbound_bytes} bytes, depth {self._splitter.max_depth})")
        for message in messages:
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        """Handle one message; nothing it does may end the reader."""
        try:
            self._handle(message)
        except BadMessageError as bad:
            self._count(bad.reason, bad.detail)
        except SimError:
            pass  # a handshake reply could not be sent: the connection is down, the loop ends
        except Exception as exc:  # a bug must cost one message, not the link
            self._count("handler_error", f"{type(exc).__name__}: {exc}")

    def _count(self, reason: str, detail: str) -> None:
        with self._stats_lock:
            self._bad[reason] = self._bad.get(reason, 0) + 1
        self._warn_once(reason, detail)

    def _warn_once(self, kind: str, detail: str) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        log.warning("simulator %s:%s: %s: %s (further ones are counted, not logged)", self.host, self.port,
                    kind, detail)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("msg_type")
        if kind == "telemetry":
            self._on_telemetry(message)
        elif kind == "scene_selection_ready":
            self.send({"msg_type": "get_scene_names"})
        elif kind == "scene_names":
            names = message.get("scene_names")
            self.scene_names = [n for n in names if isinstance(n, str)][:1000] if isinstance(names, list) else []
            if self.scene_names and self.scene not in self.scene_names:
                log.warning("simulator has no scene %r (it offers %s)", self.scene, self.scene_names[:20])
            self.send({"msg_type": "load_scene", "scene_name": self.scene})
        elif kind == "car_loaded":
            self._loaded.set()
            self._settled.set()
        elif kind == "collision_with_starting_line":
            self.line_crossings += 1
        elif not isinstance(kind, str):
            raise BadMessageError("bad_field:msg_type", f"not a string: {kind!r:.40}")
        else:
            log.debug("ignoring simulator message %r", kind)

    def _on_telemetry(self, message: dict[str, Any]) -> None:
        numbers = parse_numbers(message)  # cheap checks first: a bad field costs no image decode
        encoded = message.pop("image", None)
        encoded_b = message.pop("imageb", None)
        encoded_b_alias = message.pop("image_b", None)
        if encoded is None:
            self.frames_without_image += 1
            self._warn_once("frames_without_image", "telemetry without an image: no frame")
            return
        try:
            image = decode_image(encoded, self.image_size)
        except BadMessageError:
            self.frames_without_image += 1
            raise
        image_b = None
        if self.image_b_size is not None and (encoded_b or encoded_b_alias) is not None:
            image_b = decode_image(encoded_b if encoded_b is not None else encoded_b_alias, self.image_b_size)
        if self._down.is_set():
            return  # a successor may already be publishing into a shared slot
        self._seq += 1
        self.frames += 1
        self._telemetry.publish(Telemetry(self._seq, self._chunk_received, image, message, image_b, numbers))
