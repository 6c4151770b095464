"""Protocol transcript tests for the twin, in both directions, over a raw TCP socket.

The client here is deliberately independent of the project's own client and framing
code: a plain ``socket``, a newline-splitting reader and ``json``. What it checks is the
wire contract of the Donkey simulator (docs: ../shared/reference/donkey-sim-protocol.md):
the two handshake paths, newline-terminated compact JSON out, brace-depth framing in
(``}{``, split objects, braces inside strings, numbers as strings or numbers), the
telemetry fields and image, the control messages, lap messages, and that bad input from
one peer neither takes the twin down nor disturbs another car.

The twin runs in-process on its own asyncio loop in a background thread. Every wait has
a generous timeout and rates are asserted with wide margins: these tests must pass on a
loaded two-core CI machine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import math
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from simulator.server import ServerConfig, TwinServer

TIMEOUT = 10.0  # s to wait for any expected message (generous: CI machines stall)
LOGGER = "donkey-sim"
STANDARD_NUMBER_FIELDS = (
    "steering_angle", "throttle", "speed", "time",
    "pos_x", "pos_y", "pos_z", "vel_x", "vel_y", "vel_z",
    "cte", "activeNode", "totalNodes",
    "gyro_x", "gyro_y", "gyro_z", "accel_x", "accel_y", "accel_z",
    "pitch", "yaw", "roll",
)
# A complete JSON string literal: removed before looking for whitespace between tokens.
STRING_LITERAL = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)

Message = dict[str, Any]


# -- a raw client, independent of agent/hw/donkeysim -----------------------------------------
class PeerClosedError(Exception):
    """The twin closed the connection."""


class RawClient:
    """A plain TCP client: sends bytes as given, splits what arrives on ``\\n``."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.eof = False

    @property
    def peer_name(self) -> str:
        """How the twin names this connection in its log: HOST:PORT of our end."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self.sock.close()

    # -- sending -------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: Message) -> None:
        """As gym-donkeycar sends: ``json.dumps`` with no newline after it."""
        self.send_raw(json.dumps(message).encode())

    # -- receiving -----------------------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        """Receive one chunk before ``deadline``; TimeoutError if none, PeerClosed on EOF."""
        if self.eof:
            raise PeerClosedError
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(256 * 1024)
        except ConnectionError as exc:
            self.eof = True
            raise PeerClosedError from exc
        if not chunk:
            self.eof = True
            raise PeerClosedError
        self.buffer += chunk

    def read_line(self, timeout: float = TIMEOUT) -> bytes:
        """The next complete line, without its ``\\n``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            self._fill(deadline)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def read_message(self, timeout: float = TIMEOUT) -> Message:
        line = self.read_line(timeout)
        message = json.loads(line)
        assert isinstance(message, dict), line[:200]
        return message

    def wait_for(
        self,
        want: str | Callable[[Message], bool],
        timeout: float = TIMEOUT,
        *,
        skip: tuple[str, ...] = ("telemetry", "collision_with_starting_line"),
    ) -> tuple[Message, list[Message]]:
        """Read until a message matches ``want``; messages in between must be of a ``skip`` type.

        By default telemetry and start-line crossings (sent whenever a car drives over the line) are skipped.

        Returns the match and the messages skipped on the way.
        """
        match = (lambda m: m.get("msg_type") == want) if isinstance(want, str) else want
        deadline = time.monotonic() + timeout
        skipped: list[Message] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no message matching {want!r} within {timeout} s; "
                    f"got {len(skipped)} others: {summarize(skipped)}"
                )
            try:
                message = self.read_message(remaining)
            except TimeoutError:
                continue
            if match(message):
                return message, skipped
            assert message.get("msg_type") in skip, (
                f"unexpected {summarize([message])} while waiting for {want!r}"
            )
            skipped.append(message)

    def collect(self, duration: float) -> list[Message]:
        """Every message that arrives within ``duration`` seconds from now."""
        deadline = time.monotonic() + duration
        messages: list[Message] = []
        while True:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                messages.append(json.loads(line))
            try:
                self._fill(deadline)
            except TimeoutError:
                return messages

    def read_raw_for(self, duration: float) -> bytes:
        """All bytes (buffered included) that arrive within ``duration`` seconds."""
        deadline = time.monotonic() + duration
        with_timeout = True
        while with_timeout:
            try:
                self._fill(deadline)
            except TimeoutError:
                with_timeout = False
        data, self.buffer = self.buffer, b""
        return data

    def read_until_closed(self, timeout: float = TIMEOUT) -> list[Message]:
        """Messages until the twin closes the connection; fails if it stays open."""
        deadline = time.monotonic() + timeout
        messages: list[Message] = []
        while True:
            while b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                messages.append(json.loads(line))
            try:
                self._fill(deadline)
            except PeerClosedError:
                return messages
            except TimeoutError:
                raise AssertionError(f"the twin kept the connection open for {timeout} s") from None


def summarize(messages: list[Message]) -> str:
    return ", ".join(
        json.dumps({k: (v if k != "image" else "...") for k, v in m.items()})[:160] for m in messages[:5]
    )


def telemetry_only(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.get("msg_type") == "telemetry"]


def decode_image(field: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(field, validate=True)))
    image.load()
    return image


def is_grey_frame(frame: np.ndarray) -> bool:
    return bool(np.array_equal(frame[..., 0], frame[..., 1]) and np.array_equal(frame[..., 1], frame[..., 2]))


def is_json_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- the twin in a background thread -----------------------------------------------------------
class RunningTwin:
    """A TwinServer serving on its own event loop in a thread, until ``stop()``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server = TwinServer(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.clients: list[RawClient] = []
        self.stopped = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twin", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start() / alive()
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.start()
        self._ready.set()
        await self.server.serve()

    def start(self) -> RunningTwin:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "the twin did not start listening"
        assert self.error is None, f"the twin failed to start: {self.error!r}"
        assert self.config.port != 0, "start() did not report the bound port"
        return self

    @property
    def port(self) -> int:
        return self.config.port

    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self.server.stop_reason

    def connect(self) -> RawClient:
        client = RawClient(self.port)
        self.clients.append(client)
        return client

    def connect_with_car(self) -> RawClient:
        """Connect and complete whichever handshake the twin offers; returns after car_loaded."""
        client = self.connect()
        first = client.read_message()
        if first["msg_type"] == "scene_selection_ready":
            client.send({"msg_type": "load_scene", "scene_name": "generated_track"})
            client.wait_for("car_loaded", skip=())
        else:
            assert first["msg_type"] == "car_loaded", first
        return client

    def stop(self, *, close_clients: bool = True) -> None:
        """Request a stop from outside the loop and wait; by default our clients hang up first."""
        self.stopped = True
        if close_clients:
            for client in self.clients:
                client.close()
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.request_stop, "test finished")
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the twin did not stop"


@pytest.fixture
def twin(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., RunningTwin]]:
    """A factory: ``twin(track=None | "generated_track", fps=, time_scale=, max_message_bytes=, **ServerConfig)``."""
    yield from running_twins(caplog)


def running_twins(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., RunningTwin]]:
    """The body of the ``twin`` fixture, for other test modules' own ``twin`` fixtures."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    running: list[RunningTwin] = []

    def start(
        track: str | None = "generated_track",
        *,
        fps: float = 20.0,
        time_scale: float = 1.0,
        max_message_bytes: int | None = None,
        **options: Any,
    ) -> RunningTwin:
        config = ServerConfig(host="127.0.0.1", port=0, track=track, fps=fps, time_scale=time_scale, **options)
        if max_message_bytes is not None:
            config.max_message_bytes = max_message_bytes
        instance = RunningTwin(config)
        running.append(instance)
        return instance.start()

    yield start
    died = [
        f"{instance.error!r} {instance.server.stop_reason}".strip()
        for instance in running
        if not instance.stopped and not instance.alive()  # stopped on purpose by the test: fine
    ]
    for instance in running:
        instance.stop()
    assert not died, f"the twin died during the test: {died}"
    crashes = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert not crashes, f"the twin logged errors: {crashes}"


# -- 1, 2: handshakes --------------------------------------------------------------------------
def test_handshake_path_a_menu(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track=None)
    client = server.connect()

    assert client.read_line() == b'{"msg_type":"scene_selection_ready","loaded":"1"}'
    assert client.collect(0.3) == [], "the menu must not stream anything before a scene is loaded"

    client.send({"msg_type": "get_scene_names"})
    names = client.read_message()
    assert names["msg_type"] == "scene_names"
    assert isinstance(names["scene_names"], list)
    assert all(isinstance(name, str) for name in names["scene_names"])
    assert {"generated_track", "mountain_track"} <= set(names["scene_names"])

    client.send({"msg_type": "load_scene", "scene_name": "generated_track"})
    assert client.read_message() == {"msg_type": "car_loaded"}
    telemetry, skipped = client.wait_for("telemetry", skip=())
    assert skipped == []
    assert is_json_number(telemetry["time"])


def test_handshake_path_b_preloaded(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track")
    client = server.connect()

    assert client.read_message() == {"msg_type": "car_loaded"}
    messages = client.collect(0.5)
    kinds = {m["msg_type"] for m in messages}
    assert "scene_selection_ready" not in kinds
    assert kinds == {"telemetry"}, f"expected telemetry after car_loaded, got {kinds}"


# -- 3, 4: what the twin sends ------------------------------------------------------------------
def test_outbound_framing_one_compact_object_per_line(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track")
    client = server.connect()
    data = client.read_raw_for(1.0)

    lines = data.split(b"\n")
    lines.pop()  # what follows the last newline: empty, or an object still on its way
    assert len(lines) >= 10, f"only {len(lines)} lines in 1 s of telemetry"
    assert b"\r" not in data
    for line in lines:
        text = line.decode("utf-8")
        assert text.startswith("{") and text.endswith("}"), text[:80]
        message = json.loads(text)  # each line parses on its own
        assert isinstance(message, dict)
        assert isinstance(message.get("msg_type"), str)
        # No pretty-printing: no whitespace at all between tokens.
        outside_strings = STRING_LITERAL.sub(b'""', line)
        assert not re.search(rb"\s", outside_strings), f"whitespace between tokens in {text[:120]}"
    kinds = [json.loads(line)["msg_type"] for line in lines]
    assert kinds[0] == "car_loaded"
    assert set(kinds[1:]) == {"telemetry"}


def test_telemetry_content(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track")
    client = server.connect_with_car()
    first, _ = client.wait_for("telemetry")
    frames = [first, *telemetry_only(client.collect(0.5))]
    assert len(frames) >= 4

    for message in frames:
        for name in STANDARD_NUMBER_FIELDS:
            assert name in message, f"telemetry lacks {name}"
            assert is_json_number(message[name]), f"{name} is not a JSON number: {message[name]!r}"
        assert isinstance(message["activeNode"], int)
        assert isinstance(message["totalNodes"], int)
        assert message["totalNodes"] > 0
        assert 0 <= message["activeNode"] < message["totalNodes"]
        assert message["hit"] == "none"  # standing on the start line, on the track
        assert 0.0 <= message["yaw"] < 360.0

    image = decode_image(first["image"])
    assert image.format == "JPEG"
    assert image.size == (160, 120)
    assert image.mode == "RGB"

    times = [m["time"] for m in frames]
    assert all(later > earlier for earlier, later in itertools.pairwise(times)), times


# -- 5: what the twin accepts -------------------------------------------------------------------
def test_inbound_framing(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track")
    client = server.connect_with_car()
    client.wait_for("telemetry")

    # Two objects back to back, no separator: two replies.
    client.send_raw(b'{"msg_type":"get_protocol_version"}{"msg_type":"get_protocol_version"}')
    for _ in range(2):
        reply, _ = client.wait_for("protocol_version")
        assert reply["version"] == "2"

    # One object sent byte by byte, numbers as strings (what the Unity simulator expects).
    control = b'{"msg_type":"control","steering":"0","throttle":"0.5","brake":"0"}'
    for byte in control:
        client.send_raw(bytes([byte]))
        time.sleep(0.001)
    moving, _ = client.wait_for(lambda m: m.get("msg_type") == "telemetry" and m["throttle"] == 0.5)
    later = telemetry_only(client.collect(0.5))
    assert later, "telemetry stopped"
    assert later[-1]["speed"] > moving["speed"] >= 0.0, "speed does not rise under throttle 0.5"
    assert later[-1]["speed"] > 0.0

    # Braces inside string values, a number as a string and a number as a JSON number.
    client.send_raw(
        b'{"msg_type":"control","note":"}{ {{ \\"}\\" }","steering":"-0.7","throttle":0.5,"brake":"0"}'
    )
    steered, _ = client.wait_for(lambda m: m.get("msg_type") == "telemetry" and m["steering_angle"] != 0.0)
    assert steered["steering_angle"] == pytest.approx(-0.7)
    assert steered["throttle"] == pytest.approx(0.5)

    # One object split across several sends, JSON numbers only.
    for part in (b'{"msg_type":"contr', b'ol","steering":0.25,', b'"throttle":0.5', b',"brake":0}'):
        client.send_raw(part)
        time.sleep(0.02)
    steered, _ = client.wait_for(
        lambda m: m.get("msg_type") == "telemetry" and m["steering_angle"] == pytest.approx(0.25)
    )
    assert steered["throttle"] == pytest.approx(0.5)

    # The stream is still in sync: a request after all that is answered.
    client.send({"msg_type": "get_protocol_version"})
    reply, _ = client.wait_for("protocol_version")
    assert reply == {"msg_type": "protocol_version", "version": "2"}


# -- 6: cam_config ------------------------------------------------------------------------------
def test_cam_config_size_encoding_and_depth(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track")
    client = server.connect_with_car()
    client.send({"msg_type": "cam_config", "img_w": "320", "img_h": "240", "img_enc": "PNG",
                 "fov": "0", "img_d": "0"})

    def is_png(message: Message) -> bool:
        return message.get("msg_type") == "telemetry" and decode_image(message["image"]).format == "PNG"

    colour, _ = client.wait_for(is_png)
    for message in [colour, *telemetry_only(client.collect(0.3))]:
        image = decode_image(message["image"])
        assert image.format == "PNG"
        assert image.size == (320, 240)
        assert image.mode == "RGB"
    pixels = np.asarray(decode_image(colour["image"]))
    assert pixels.shape == (240, 320, 3)
    assert not np.array_equal(pixels[..., 0], pixels[..., 1]), "the colour frame is already grey"

    client.send({"msg_type": "cam_config", "img_d": "1"})  # 0/absent keeps size and encoding

    def is_grey(message: Message) -> bool:
        if message.get("msg_type") != "telemetry":
            return False
        return is_grey_frame(np.asarray(decode_image(message["image"])))

    grey, _ = client.wait_for(is_grey)
    for message in [grey, *telemetry_only(client.collect(0.3))]:
        image = decode_image(message["image"])
        assert image.format == "PNG" and image.size == (320, 240) and image.mode == "RGB"
        assert is_grey_frame(np.asarray(image))


# -- 7: reset_car -------------------------------------------------------------------------------
def test_reset_car_returns_to_start_without_reply(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track", time_scale=5.0)
    client = server.connect_with_car()
    start, _ = client.wait_for("telemetry")
    x0, z0 = start["pos_x"], start["pos_z"]

    def distance(message: Message) -> float:
        return math.hypot(message["pos_x"] - x0, message["pos_z"] - z0)

    client.send({"msg_type": "control", "steering": "0", "throttle": "0.5", "brake": "0"})
    moved, _ = client.wait_for(lambda m: m.get("msg_type") == "telemetry" and distance(m) > 0.5)
    assert moved["speed"] > 0.1

    client.send({"msg_type": "reset_car"})
    after = client.collect(1.0)
    assert after, "telemetry stopped after reset_car"
    assert {m["msg_type"] for m in after} == {"telemetry"}, f"reset_car got a reply: {summarize(after)}"
    back = [m for m in after if distance(m) < 0.05 and abs(m["speed"]) < 0.01]
    assert back, f"the car never came back to the start: last at {distance(after[-1]):.2f} m"
    last = after[-1]
    assert distance(last) < 0.05, "the car drove off again after reset_car (controls not zeroed)"
    assert last["speed"] == pytest.approx(0.0, abs=0.01)
    assert last["throttle"] == 0.0


# -- 8: exit_scene ------------------------------------------------------------------------------
def test_exit_scene_back_to_menu_and_reload(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track=None)
    client = server.connect()
    assert client.read_message()["msg_type"] == "scene_selection_ready"
    client.send({"msg_type": "load_scene", "scene_name": "generated_track"})
    client.wait_for("car_loaded", skip=())
    client.wait_for("telemetry", skip=())

    client.send({"msg_type": "exit_scene"})
    ready, _ = client.wait_for("scene_selection_ready")
    assert ready == {"msg_type": "scene_selection_ready", "loaded": "1"}
    assert client.collect(0.6) == [], "telemetry continued after exit_scene"

    client.send({"msg_type": "load_scene", "scene_name": "mountain_track"})
    client.wait_for("car_loaded", skip=())
    telemetry, _ = client.wait_for("telemetry", skip=())
    assert is_json_number(telemetry["speed"])


# -- 9: laps --------------------------------------------------------------------------------------
def test_collision_with_starting_line_once_per_crossing(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track", time_scale=20.0)
    client = server.connect_with_car()
    start, _ = client.wait_for("telemetry")
    yaw = math.radians(start["yaw"])  # Unity: 0 faces +z, clockwise positive
    forward = (math.sin(yaw), math.cos(yaw))
    behind_x = start["pos_x"] - 0.5 * forward[0]
    behind_z = start["pos_z"] - 0.5 * forward[1]

    client.send({
        "msg_type": "set_position",
        "pos_x": str(behind_x), "pos_y": "0", "pos_z": str(behind_z),
        "Qx": "0", "Qy": str(math.sin(yaw / 2)), "Qz": "0", "Qw": str(math.cos(yaw / 2)),
    })
    placed, _ = client.wait_for(
        lambda m: m.get("msg_type") == "telemetry"
        and math.hypot(m["pos_x"] - behind_x, m["pos_z"] - behind_z) < 0.05
    )
    assert placed["yaw"] == pytest.approx(start["yaw"], abs=1.0)
    assert abs(placed["cte"]) < 0.1, "0.5 m behind the start line should be on the centreline"

    client.send({"msg_type": "control", "steering": "0", "throttle": "0.3", "brake": "0"})
    lap, before = client.wait_for("collision_with_starting_line")
    assert set(lap) >= {"msg_type", "starting_line_index", "timeStamp"}
    assert isinstance(lap["starting_line_index"], int) and not isinstance(lap["starting_line_index"], bool)
    assert lap["starting_line_index"] == 0
    assert is_json_number(lap["timeStamp"])
    if before:
        assert lap["timeStamp"] > before[-1]["time"]

    after = client.collect(1.0)
    kinds = [m["msg_type"] for m in after]
    assert "collision_with_starting_line" not in kinds, "the start line was reported twice for one crossing"
    driving = telemetry_only(after)
    assert len(driving) >= 5, "telemetry stopped after the lap"
    assert lap["timeStamp"] <= driving[0]["time"]
    assert driving[-1]["time"] > driving[0]["time"]
    assert max(m["speed"] for m in driving) > 0.1, "the car was not driving after the line"


# -- 10, 11: unknown messages and quit_app ---------------------------------------------------
def test_unknown_msg_type_is_ignored(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track")
    client = server.connect_with_car()
    client.wait_for("telemetry")

    client.send({"msg_type": "frobnicate", "value": "1"})
    client.send({"msg_type": "ping"})
    client.send({"msg_type": "lidar_config", "degPerSweepInc": "2"})
    client.send({"msg_type": "get_protocol_version"})
    reply, skipped = client.wait_for("protocol_version")  # anything but telemetry in between fails
    assert reply["version"] == "2"
    after = client.collect(0.5)
    assert after and {m["msg_type"] for m in after} == {"telemetry"}
    assert all(m.get("msg_type") == "telemetry" for m in skipped)


def test_quit_app_closes_only_that_connection(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track")
    first = server.connect_with_car()
    first.wait_for("telemetry")

    first.send({"msg_type": "quit_app"})
    last_words = first.read_until_closed()
    assert {m["msg_type"] for m in last_words} <= {"telemetry"}

    assert server.alive()
    second = server.connect_with_car()
    telemetry, _ = second.wait_for("telemetry")
    assert is_json_number(telemetry["time"])
    second.send({"msg_type": "get_protocol_version"})
    assert second.wait_for("protocol_version")[0]["version"] == "2"


# -- 12: bad input -----------------------------------------------------------------------------
class TelemetryCounter(threading.Thread):
    """Counts one client's telemetry over a fixed window, reading without pause."""

    def __init__(self, client: RawClient, window: float) -> None:
        super().__init__(daemon=True)
        self.client, self.window = client, window
        self.frames = 0
        self.other: list[Message] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for message in self.client.collect(self.window):
                if message.get("msg_type") == "telemetry":
                    self.frames += 1
                else:
                    self.other.append(message)
        except BaseException as exc:
            self.error = exc


# The flooding client runs in a child process: in-process it would compete with the twin
# for the GIL, which measures the test's threads rather than the twin's fairness.
FLOOD_SCRIPT = """
import json, socket, sys, time
port, duration = int(sys.argv[1]), float(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port), timeout=10)
first = sock.recv(4096)  # car_loaded: the car exists before the flood starts
one = json.dumps({"msg_type": "control", "steering": "0.1", "throttle": "0.2", "brake": "0"}).encode()
batch, sent = one * 200, 0
print("ready", flush=True)
deadline = time.monotonic() + duration
while time.monotonic() < deadline:
    sock.sendall(batch)
    sent += 200
print(sent, first.split(b"\\n")[0].decode(), flush=True)
"""


def start_flooder(port: int, duration: float) -> subprocess.Popen[str]:
    """A client in a child process that sends control messages as fast as it can."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOD_SCRIPT, str(port), str(duration)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", "the flooding client did not connect"
    return proc


def problem_records(caplog: pytest.LogCaptureFixture, peer: str, kind: str) -> list[str]:
    prefix = f"peer {peer}: {kind}:"
    return [
        r.getMessage() for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and r.getMessage().startswith(prefix)
    ]


def test_bad_input_never_disturbs_other_cars(
    twin: Callable[..., RunningTwin], caplog: pytest.LogCaptureFixture
) -> None:
    fps, window = 20.0, 3.0
    server = twin(track="generated_track", fps=fps, max_message_bytes=4096)
    victim = server.connect_with_car()
    victim.wait_for("telemetry")
    bad = server.connect_with_car()
    bad_peer, victim_peer = bad.peer_name, victim.peer_name

    flooder = start_flooder(server.port, 2.0)
    counter = TelemetryCounter(victim, window)
    counter.start()
    try:
        bad_client_transcript(bad)
        counter.join(window + TIMEOUT)
        flood_report, _ = flooder.communicate(timeout=TIMEOUT)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    assert counter.error is None, f"the victim's connection failed: {counter.error!r}"
    assert flooder.returncode == 0, "the flooding client failed"
    flood_sent, flood_first = flood_report.split()
    assert flood_first == '{"msg_type":"car_loaded"}'
    assert int(flood_sent) >= 1000, f"the flood sent only {flood_sent} messages"
    expected = fps * window
    assert counter.frames >= 0.7 * expected, (
        f"the victim got {counter.frames} frames in {window} s, expected about {expected:.0f}"
    )
    assert counter.other == []

    # The twin still accepts a fresh car.
    assert server.alive()
    fresh = server.connect_with_car()
    fresh.wait_for("telemetry")

    # Each problem kind logged once, naming the bad peer; nothing about the victim.
    deadline = time.monotonic() + TIMEOUT
    while not problem_records(caplog, bad_peer, "disconnected mid-message") and time.monotonic() < deadline:
        time.sleep(0.05)
    for kind in ("malformed JSON", "oversized message", "stray bytes", "disconnected mid-message"):
        records = problem_records(caplog, bad_peer, kind)
        assert len(records) == 1, f"{kind!r} logged {len(records)} times for {bad_peer}: {records}"
    victim_warnings = [
        r.getMessage() for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and victim_peer in r.getMessage()
    ]
    assert victim_warnings == []


def bad_client_transcript(bad: RawClient) -> None:
    """Malformed, oversized and junk input, each followed by proof the connection still works."""

    def still_answers() -> None:
        bad.send({"msg_type": "get_protocol_version"})
        reply, _ = bad.wait_for("protocol_version")
        assert reply["version"] == "2"

    # (a) malformed JSON, five times; once followed by a valid object in the same send.
    malformed = b'{"msg_type": "control", "steering": }'
    for _ in range(4):
        bad.send_raw(malformed)
        still_answers()
    bad.send_raw(malformed + b'{"msg_type":"get_protocol_version"}')
    assert bad.wait_for("protocol_version")[0]["version"] == "2"
    # (b) messages over max_message_bytes, one of them sent in pieces.
    oversized = json.dumps({"msg_type": "control", "steering": "0.1", "pad": "x" * 10_000}).encode()
    bad.send_raw(oversized)
    still_answers()
    for offset in range(0, len(oversized), 3000):
        bad.send_raw(oversized[offset : offset + 3000])
    still_answers()
    # (c) bytes that are not JSON at all, including invalid UTF-8.
    bad.send_raw(b"this is not json\r\n")
    still_answers()
    bad.send_raw(b"\xff\xfe\x00 ]] garbage\n")
    still_answers()
    # (d) half an object, then gone. Half-close first so that the twin sees a clean end of
    # stream after the partial object (closing with unread telemetry would send a reset).
    bad.send_raw(b'{"msg_type":"control","steering":"0.')
    bad.sock.shutdown(socket.SHUT_WR)
    bad.read_until_closed()
    bad.close()


# -- 13: several cars -----------------------------------------------------------------------------
def test_four_cars_at_twenty_hz(twin: Callable[..., RunningTwin]) -> None:
    fps, window, cars = 20.0, 3.0, 4
    server = twin(track="generated_track", fps=fps)
    clients = [server.connect_with_car() for _ in range(cars)]
    for client in clients:
        client.wait_for("telemetry")
    counters = [TelemetryCounter(client, window) for client in clients]
    for counter in counters:
        counter.start()
    for counter in counters:
        counter.join(window + TIMEOUT)

    expected = fps * window
    frames = [counter.frames for counter in counters]
    for counter in counters:
        assert counter.error is None, repr(counter.error)
        assert counter.other == []
    assert all(count >= 0.8 * expected for count in frames), f"frames per car in {window} s: {frames}"
    assert all(count <= 1.3 * expected for count in frames), f"telemetry faster than {fps} Hz: {frames}"


# -- stopping the twin -------------------------------------------------------------------------
def test_stop_with_cars_connected_is_clean(
    twin: Callable[..., RunningTwin], caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping the twin while cars are connected closes them without error tracebacks."""
    server = twin(track="generated_track")
    clients = [server.connect_with_car() for _ in range(2)]
    for client in clients:
        client.wait_for("telemetry")

    server.stop(close_clients=False)
    for client in clients:
        assert {m["msg_type"] for m in client.read_until_closed()} <= {"telemetry"}
    errors = [
        f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else f"{r.name}: {r.getMessage()}"
        for r in caplog.records if r.levelno >= logging.ERROR
    ]
    assert errors == [], f"errors logged while stopping the twin: {errors}"
    assert server.server.stop_reason == "test finished"
