"""The twin's TCP server: the Donkey simulator protocol, one car per connection.

Each connection is a session with its own world (cars do not see or hit each other) that
starts in the menu (handshake path A: ``scene_selection_ready`` -> ``load_scene`` ->
``car_loaded``) or, when the server was started with a track, with a car already loaded
(path B). Telemetry is paced on absolute deadlines; a late tick is skipped, never
bunched. Bad input is counted and logged once per peer and kind; it never ends the
server or slows another car.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from agent.hw.donkeysim import PROTOCOL_VERSION
from agent.hw.donkeysim.framing import DEFAULT_MAX_OBJECT_BYTES, JsonObjectSplitter, ProtocolError, encode
from agent.hw.donkeysim.framing import get_float as number
from agent.hw.donkeysim.framing import get_str as text
from simulator.render import CameraConfig, Randomization
from simulator.track import DEFAULT_TRACK, get_track, track_names
from simulator.world import TwinCar

log = logging.getLogger("donkey-sim")

MAX_WRITE_BACKLOG = 1024 * 1024  # bytes queued to a peer before frames are skipped for it
MAX_STEP = 0.25  # s of physics per tick at most (after a stall the car does not teleport)
# Parse at most this much per turn of the event loop: ~100 control messages, so a flooding
# peer delays the other cars' ticks by well under a millisecond even on a busy CPU.
READ_CHUNK = 8 * 1024
ENCODINGS = {"JPG": "JPEG", "JPEG": "JPEG", "PNG": "PNG", "TGA": "TGA"}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9091
    track: str | None = None  # preloaded scene (path B); None starts each session in the menu
    seed: int = 0
    fps: float = 20.0
    randomization: Randomization = field(default_factory=Randomization)
    max_message_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    exit_on_quit: bool = False  # `quit_app` stops the whole twin (the Unity app quits)
    time_scale: float = 1.0  # simulated seconds per wall-clock second (a twin extension)


@dataclass
class CarRecord:
    """One spawned car, for the summary."""

    number: int
    peer: str
    track: str
    car_name: str = ""
    spawned_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    frames_sent: int = 0
    frames_skipped: int = 0  # ticks lost to a late loop or a slow peer
    car: TwinCar | None = None

    def as_dict(self) -> dict[str, Any]:
        end = self.ended_at or time.time()
        stats = self.car.stats.as_dict() if self.car else {}
        controls = [round(self.car.steering, 4), round(self.car.throttle, 4)] if self.car else None
        return {
            "car": self.number,
            "peer": self.peer,
            "track": self.track,
            "car_name": self.car_name,
            "connected_s": round(end - self.spawned_at, 2),
            "frames_sent": self.frames_sent,
            "frames_skipped": self.frames_skipped,
            "last_controls": controls,  # steering, throttle when the car ended: neutral after a safe stop
            **stats,
        }


def _camera_from_message(message: dict[str, Any], base: CameraConfig) -> CameraConfig:
    """Apply a `cam_config`: 0 (or absent) keeps the current value, as in the Unity simulator."""
    changes: dict[str, Any] = {}

    def set_if(key: str, attr: str, cast: Any = float, low: float = 0.0, high: float = math.inf) -> None:
        value = number(message, key, 0.0)
        if value != 0.0:
            if not low <= value <= high:
                raise ProtocolError(f"cam_config: {key}={value} is outside [{low}, {high}]")
            changes[attr] = cast(value)

    set_if("img_w", "width", int, 8, 1920)
    set_if("img_h", "height", int, 8, 1080)
    set_if("fov", "fov", float, 10, 150)
    set_if("offset_x", "right_m", float, -2, 2)
    set_if("offset_y", "height_m", float, 0.02, 3)
    set_if("offset_z", "forward_m", float, -2, 2)
    set_if("rot_x", "pitch", float, -80, 89)
    depth = number(message, "img_d", 0.0)
    if depth not in (0.0, 1.0, 3.0):
        raise ProtocolError(f"cam_config: img_d={depth} must be 1 or 3")
    if depth:
        changes["grayscale"] = depth == 1.0
    encoding = text(message, "img_enc", "").upper()
    if encoding:
        if encoding not in ENCODINGS:
            raise ProtocolError(f"cam_config: img_enc={encoding!r} must be one of JPG, PNG, TGA")
        changes["encoding"] = encoding
    return base.with_overrides(**changes)


class CarSession:
    """One TCP connection and, once a scene is loaded, its car."""

    def __init__(self, server: TwinServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.splitter = JsonObjectSplitter(max_object_bytes=server.config.max_message_bytes)
        self.camera = CameraConfig()
        self.camera_b: CameraConfig | None = None
        self.car_name = ""
        self.record: CarRecord | None = None
        self.car: TwinCar | None = None
        self._warned: set[str] = set()
        self._counts: dict[str, int] = {}
        self._closed = asyncio.Event()

    # -- logging bad input once per peer and kind ------------------------------------------
    def problem(self, kind: str, detail: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("peer %s: %s: %s (further ones are counted, not logged)", self.peer, kind, detail)

    def _sync_framing_problems(self) -> None:
        stats = self.splitter.stats
        for kind, count, detail in (
            ("malformed JSON", stats.malformed, "an object that is not valid JSON was skipped"),
            ("oversized message", stats.oversized,
             f"an object over {self.splitter.max_object_bytes} bytes was skipped"),
            ("stray bytes", stats.garbage_bytes, "bytes outside any JSON object were skipped"),
            ("nested too deep", stats.too_deep, "an object nested deeper than the cap was skipped"),
            ("resynchronised", stats.resyncs, "a broken object was dropped at the next line"),
        ):
            seen = self._counts.get(kind, 0)
            if count > seen:
                self.problem(kind, detail)
                self._counts[kind] = count

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        log.info("peer %s connected", self.peer)
        if self.server.config.track:
            await self.spawn(self.server.config.track)
        else:
            self.send({"msg_type": "scene_selection_ready", "loaded": "1"})
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._telemetry_loop(), name=f"telemetry {self.peer}")
                await self._read_loop()
                self._closed.set()
        finally:
            self._closed.set()
            self.despawn()
            self.writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await asyncio.wait_for(self.writer.wait_closed(), 1.0)
            summary = ", ".join(f"{k}: {v}" for k, v in sorted(self._counts.items()))
            log.info("peer %s disconnected%s", self.peer, f" ({summary})" if summary else "")

    async def _read_loop(self) -> None:
        while not self._closed.is_set():
            try:
                data = await self.reader.read(READ_CHUNK)
            except (ConnectionError, OSError) as exc:
                if self.splitter.pending_bytes:
                    self.problem("disconnected mid-message", f"{self.splitter.pending_bytes} bytes unfinished")
                self.problem("connection error", str(exc))
                return
            if not data:
                if self.splitter.pending_bytes:
                    self.problem("disconnected mid-message", f"{self.splitter.pending_bytes} bytes unfinished")
                return
            for message in self.splitter.feed(data):
                try:
                    await self.handle(message)
                except ProtocolError as exc:
                    self.problem(f"invalid {message.get('msg_type', 'message')}", str(exc))
            self._sync_framing_problems()
            # A flooding peer must not starve the other cars' telemetry: yield each chunk.
            await asyncio.sleep(0)

    def send(self, message: dict[str, Any]) -> bool:
        if self.writer.is_closing():
            return False
        self.writer.write(encode(message))
        return True

    # -- the car ----------------------------------------------------------------------------
    async def spawn(self, scene: str) -> None:
        if scene not in track_names():
            fallback = self.server.config.track or DEFAULT_TRACK
            self.problem("unknown scene", f"{scene!r} is not one of {track_names()}; loading {fallback!r}")
            scene = fallback
        self.despawn()
        car = await self.server.make_car(scene, self.camera)
        self.car = car
        self.record = self.server.register(self.peer, scene, car)
        self.record.car_name = self.car_name
        self.send({"msg_type": "car_loaded"})
        log.info("peer %s: car %d loaded on %s", self.peer, self.record.number, scene)

    def despawn(self) -> None:
        if self.record is not None and self.record.ended_at is None:
            self.record.ended_at = time.time()
        self.car = None

    async def _telemetry_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.server.config.fps
        deadline = loop.time()
        last_step: float | None = None
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), max(0.0, deadline - loop.time()))
            if self._closed.is_set():
                return
            now = loop.time()
            car, record = self.car, self.record
            if car is not None and record is not None:
                if last_step is None:
                    last_step = now
                laps = car.advance(min(MAX_STEP, now - last_step) * self.server.config.time_scale)
                last_step = now
                for _ in range(laps):
                    self.send({"msg_type": "collision_with_starting_line", "starting_line_index": 0,
                               "timeStamp": car.time})
                if self.writer.transport.get_write_buffer_size() > MAX_WRITE_BACKLOG:
                    record.frames_skipped += 1
                    self.problem("slow reader", "the peer is not reading; frames are skipped for it")
                else:
                    self.send(self._telemetry(car))
                    record.frames_sent += 1
            else:
                last_step = None
            deadline += period
            if deadline < now:  # late: skip the missed ticks instead of sending a burst
                missed = math.floor((now - deadline) / period) + 1
                deadline += missed * period
                if record is not None and car is not None:
                    record.frames_skipped += missed

    def _telemetry(self, car: TwinCar) -> dict[str, Any]:
        message = car.telemetry()
        message["image"] = self._encode_frame(car, self.camera)
        if self.camera_b is not None:
            frame_b = self._encode_frame(car, self.camera_b)
            message["imageb"] = frame_b  # what the Unity simulator sends
            message["image_b"] = frame_b  # what gym-donkeycar reads
        return message

    @staticmethod
    def _encode_frame(car: TwinCar, camera: CameraConfig) -> str:
        frame = car.render(camera)
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format=ENCODINGS[camera.encoding])
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    # -- messages -----------------------------------------------------------------------------
    async def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("msg_type")
        if not isinstance(kind, str):
            raise ProtocolError("an object without a string msg_type")
        car = self.car
        if kind == "control":
            steering = number(message, "steering", 0.0, low=-1.0, high=1.0)
            throttle = number(message, "throttle", 0.0, low=-1.0, high=1.0)
            brake = number(message, "brake", 0.0, low=0.0, high=1.0)
            if car is not None:
                car.set_controls(steering, throttle, brake)
        elif kind == "get_protocol_version":
            self.send({"msg_type": "protocol_version", "version": PROTOCOL_VERSION})
        elif kind == "get_scene_names":
            self.send({"msg_type": "scene_names", "scene_names": track_names()})
        elif kind == "load_scene":
            await self.spawn(text(message, "scene_name"))
        elif kind == "reset_car":
            if car is not None:
                car.reset()
        elif kind == "exit_scene":
            self.despawn()
            self.send({"msg_type": "scene_selection_ready", "loaded": "1"})
        elif kind == "quit_app":
            log.info("peer %s sent quit_app", self.peer)
            self._closed.set()
            if self.server.config.exit_on_quit:
                self.server.request_stop("quit_app from " + self.peer)
        elif kind == "car_config":
            self.car_name = text(message, "car_name", "")[:64]
            if self.record is not None:
                self.record.car_name = self.car_name
        elif kind == "racer_info":
            self.car_name = text(message, "car_name", self.car_name)[:64]
        elif kind in ("cam_config", "cam_config_b"):
            base = self.camera if kind == "cam_config" else (self.camera_b or CameraConfig())
            camera = _camera_from_message(message, base)
            if kind == "cam_config":
                self.camera = camera
            else:
                self.camera_b = camera
            if car is not None:
                car.renderer(camera)  # build the projection tables now, not mid-telemetry
        elif kind == "set_position":
            if car is not None:
                yaw = None
                if "Qy" in message and "Qw" in message:
                    qy, qw = number(message, "Qy"), number(message, "Qw")
                    yaw = 2.0 * math.atan2(qy, qw)
                car.set_pose(number(message, "pos_x"), number(message, "pos_z"), yaw)
        elif kind == "node_position":
            if car is not None:
                index = int(number(message, "index")) % car.track.node_count
                x, z, heading = car.track.point_at(index * car.track.spacing)
                self.send({"msg_type": "node_position", "index": index, "pos_x": x, "pos_y": 0.0, "pos_z": z,
                           "Qx": 0.0, "Qy": math.sin(heading / 2), "Qz": 0.0, "Qw": math.cos(heading / 2)})
        else:
            # lidar_config, step_mode, regen_road, ping and anything newer: accepted, ignored.
            log.debug("peer %s: ignoring %s", self.peer, kind)


class TwinServer:
    """Serves cars until ``request_stop``; ``summary()`` says what every car did."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cars: list[CarRecord] = []
        self._numbers = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.stop_reason = ""
        self.started_at = time.time()

    async def make_car(self, scene: str, camera: CameraConfig) -> TwinCar:
        # Building a world texture takes ~0.2 s: do it off the event loop so the other
        # cars keep their telemetry rate (textures are cached per track and seed).
        return await asyncio.to_thread(
            TwinCar, scene, seed=self.config.seed, camera=camera, randomization=self.config.randomization
        )

    def register(self, peer: str, scene: str, car: TwinCar) -> CarRecord:
        record = CarRecord(number=next(self._numbers), peer=peer, track=scene, car=car)
        self.cars.append(record)
        return record

    async def start(self) -> None:
        get_track(self.config.track or DEFAULT_TRACK)
        self._server = await asyncio.start_server(self._accept, self.config.host, self.config.port)
        sockets = list(self._server.sockets)
        if sockets and self.config.port == 0:
            self.config.port = sockets[0].getsockname()[1]
        log.info("twin listening on %s:%d (%s, %.0f Hz)", self.config.host, self.config.port,
                 f"scene {self.config.track} loaded" if self.config.track else "menu", self.config.fps)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await CarSession(self, reader, writer).run()
        except asyncio.CancelledError:
            # The twin is stopping. Not re-raised: asyncio on Python 3.11 logs a cancelled
            # connection handler as an error.
            pass
        except Exception:  # a bug in one session must not take the twin down
            log.exception("session failed")
        finally:
            self._sessions.discard(task)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self._stop.set()

    async def serve(self, duration: float | None = None) -> None:
        """Serve until stopped (or for ``duration`` seconds), then close every session."""
        if self._server is None:
            await self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), duration)
        if not self._stop.is_set():
            self.stop_reason = f"duration of {duration} s reached"
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def summary(self) -> dict[str, Any]:
        return {
            "version": 1,
            "twin": {
                "host": self.config.host,
                "port": self.config.port,
                "fps": self.config.fps,
                "seed": self.config.seed,
                "track": self.config.track,
                "started_at": self.started_at,
                "ended_at": time.time(),
                "stop_reason": self.stop_reason,
            },
            "cars": [record.as_dict() for record in self.cars],
        }
