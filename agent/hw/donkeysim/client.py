"""A Donkey simulator protocol client: drives our twin and the Unity Donkey simulator alike.

One reader thread owns the socket's inbound side: it splits objects, decodes camera frames
and publishes each telemetry message as an immutable ``Telemetry`` with a sequence number
and receive timestamp. Consumers take the newest one (a single reference assignment, so no
lock on the reading side) or wait for the next. Outbound messages carry numbers as strings,
as the Unity simulator requires.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from agent.hw.donkeysim import DEFAULT_PORT
from agent.hw.donkeysim.framing import JsonObjectSplitter, encode
from agent.hw.slot import LatestSlot

log = logging.getLogger(__name__)

MAX_INBOUND_OBJECT = 16 * 1024 * 1024  # a large PNG frame from the Unity sim still fits


class SimError(ConnectionError):
    """The simulator could not be reached, refused the handshake or went away."""


@dataclass(frozen=True)
class Telemetry:
    seq: int  # increases by one per telemetry message received
    received: float  # time.monotonic() when the message was parsed
    image: NDArray[np.uint8] | None  # (H, W, 3) RGB
    fields: dict[str, Any] = field(repr=False)  # everything else, as sent
    image_b: NDArray[np.uint8] | None = None

    def number(self, key: str, default: float = 0.0) -> float:
        value = self.fields.get(key, default)
        try:
            return float(value)
        except (TypeError, ValueError):
            return default


def decode_image(data: str) -> NDArray[np.uint8]:
    """Base64 JPEG/PNG/TGA to an (H, W, 3) uint8 RGB array."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("RGB"))


class SimClient:
    """Connects one car to a simulator; ``connect()`` returns once the car is loaded."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        scene: str = "generated_track",
        camera: dict[str, Any] | None = None,
        car_name: str = "donkey-agent",
        connect_timeout: float = 15.0,
    ) -> None:
        self.host, self.port = host, port
        self.scene = scene
        self.camera = {"img_w": 160, "img_h": 120, "img_d": 3, "img_enc": "JPG", **(camera or {})}
        self.car_name = car_name
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()  # control and config may come from two threads
        self._telemetry: LatestSlot[Telemetry] = LatestSlot()
        self._loaded = threading.Event()
        self._closed = threading.Event()
        self.scene_names: list[str] = []
        self.laps = 0  # collision_with_starting_line messages received
        self.bad_frames = 0
        self.disconnect_reason: str | None = None
        self._seq = 0

    # -- lifecycle -----------------------------------------------------------------------
    def connect(self) -> SimClient:
        deadline = time.monotonic() + self.connect_timeout
        last_error: OSError | None = None
        while time.monotonic() < deadline:  # the simulator may still be starting
            try:
                self._sock = socket.create_connection((self.host, self.port), timeout=2.0)
                break
            except OSError as exc:
                last_error = exc
                time.sleep(0.2)
        if self._sock is None:
            raise SimError(f"cannot reach the simulator at {self.host}:{self.port}: {last_error}")
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = threading.Thread(target=self._read_loop, name="sim-client-reader", daemon=True)
        self._reader.start()
        if not self._loaded.wait(max(0.1, deadline - time.monotonic())):
            reason = self.disconnect_reason or "no car_loaded"
            self.close()
            raise SimError(f"simulator at {self.host}:{self.port} did not load a car: {reason}")
        self.send({"msg_type": "car_config", "body_style": "donkey", "body_r": "220", "body_g": "120",
                   "body_b": "40", "car_name": self.car_name, "font_size": "50"})
        self.send({"msg_type": "cam_config", **{k: str(v) for k, v in self.camera.items()}})
        return self

    def close(self) -> None:
        """Stop the car (zero throttle, brake) and disconnect; idempotent."""
        if self._closed.is_set():
            return
        if self._sock is not None and self._loaded.is_set():
            with contextlib.suppress(OSError):
                self.send_control(0.0, 0.0, 1.0)
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2.0)
        self._telemetry.close()

    def __enter__(self) -> SimClient:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._loaded.is_set() and not self._closed.is_set()

    # -- outbound --------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        if self._sock is None or self._closed.is_set():
            raise SimError("not connected to the simulator")
        data = encode(message)
        with self._send_lock:
            self._sock.sendall(data)

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

    def _read_loop(self) -> None:
        splitter = JsonObjectSplitter(max_object_bytes=MAX_INBOUND_OBJECT)
        assert self._sock is not None
        try:
            while not self._closed.is_set():
                data = self._sock.recv(256 * 1024)
                if not data:
                    self.disconnect_reason = "the simulator closed the connection"
                    break
                for message in splitter.feed(data):
                    self._handle(message)
        except OSError as exc:
            if not self._closed.is_set():
                self.disconnect_reason = f"connection error: {exc}"
        finally:
            if not self._closed.is_set():
                log.warning("simulator %s:%s: %s", self.host, self.port, self.disconnect_reason)
            self._closed.set()
            self._telemetry.close()

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("msg_type")
        if kind == "telemetry":
            self._on_telemetry(message)
        elif kind == "scene_selection_ready":
            self.send({"msg_type": "get_scene_names"})
        elif kind == "scene_names":
            names = message.get("scene_names")
            self.scene_names = [str(n) for n in names] if isinstance(names, list) else []
            if self.scene_names and self.scene not in self.scene_names:
                log.warning("simulator has no scene %r (it offers %s)", self.scene, self.scene_names)
            self.send({"msg_type": "load_scene", "scene_name": self.scene})
        elif kind == "car_loaded":
            self._loaded.set()
        elif kind == "collision_with_starting_line":
            self.laps += 1
        else:
            log.debug("ignoring simulator message %r", kind)

    def _on_telemetry(self, message: dict[str, Any]) -> None:
        image = image_b = None
        try:
            encoded = message.pop("image", None)
            if isinstance(encoded, str) and encoded:
                image = decode_image(encoded)
            encoded_b = message.pop("imageb", None) or message.pop("image_b", None)
            if isinstance(encoded_b, str) and encoded_b:
                image_b = decode_image(encoded_b)
        except (OSError, ValueError) as exc:  # corrupt base64 or image data
            self.bad_frames += 1
            if self.bad_frames == 1:
                log.warning("undecodable camera frame from the simulator: %s", exc)
            return
        self._seq += 1
        self._telemetry.publish(Telemetry(self._seq, time.monotonic(), image, message, image_b))
