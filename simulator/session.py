"""One connection to the twin: the Donkey simulator protocol for one car, as Unity speaks it.

A session greets its peer a short while after the connection (about one frame, as Unity,
whose greetings leave its main thread a frame later at the soonest): gym-donkeycar starts
its reader thread before it installs the handler that answers, and loses anything that
arrives in between. It then starts in the menu (``scene_selection_ready`` -> ``load_scene``
-> ``car_loaded``) or, when the twin was started with a scene, with a car already loaded.

Whatever one peer does costs the others little: its reading is rate-limited (a flood slows
that peer, through TCP, not the twin), its output is bounded (``PeerOutput``), its frames
are rendered in the pool's lanes (``FramePool``), its camera is capped, its scene loads are
spaced out, and each kind of bad input is logged once and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

from agent.hw.donkeysim import PROTOCOL_VERSION
from agent.hw.donkeysim.framing import JsonObjectSplitter, ProtocolError
from agent.hw.donkeysim.framing import get_float as number
from agent.hw.donkeysim.framing import get_str as text
from simulator.frames import FrameJob, PeerCost
from simulator.peer_config import CarStyle, Problem, apply_cam_config, apply_car_config, apply_racer_info
from simulator.peer_output import PeerOutput
from simulator.render import CameraConfig
from simulator.scenes import get_scene
from simulator.world import TwinCar

if TYPE_CHECKING:
    from simulator.server import CarRecord, TwinServer

log = logging.getLogger("donkey-sim")

MAX_STEP = 0.25  # s of physics per tick at most (after a stall the car does not teleport)
# Parse at most this much per turn of the event loop: ~100 control messages.
READ_CHUNK = 8 * 1024
# Inbound budget per peer, in units of one message or one KiB, whichever is more: gym-donkeycar
# sends about 20 to 100 a second. A peer over it is read more slowly (TCP pushes back on it).
INBOUND_UNITS_PER_S = 2000.0
INBOUND_BURST = 500.0
FRAMING_DETAILS = {
    "malformed": ("malformed JSON", "an object that is not valid JSON was skipped"),
    "oversized": ("oversized message", "an object over the size cap was skipped"),
    "garbage_bytes": ("stray bytes", "bytes outside any JSON object were skipped"),
    "too_deep": ("nested too deep", "an object nested deeper than the cap was skipped"),
    "resyncs": ("resynchronised", "a broken object was dropped at the next line"),
}


class CarSession:
    """One TCP connection and, once a scene is loaded, its car."""

    def __init__(self, server: TwinServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.output = PeerOutput(writer, server.config.max_backlog)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.splitter = JsonObjectSplitter(max_object_bytes=server.config.max_message_bytes)
        self.camera = CameraConfig()
        self.camera_b: CameraConfig | None = None
        self.cost = PeerCost(self.camera)
        self.style = CarStyle()
        self.record: CarRecord | None = None
        self.car: TwinCar | None = None
        self.counts: dict[str, int] = {}
        self._warned: set[str] = set()
        self._closed = asyncio.Event()
        self._last_load = -math.inf
        self._next_frame_at = -math.inf  # a costly camera waits here: its peer's CPU share

    # -- logging: each kind once per peer ------------------------------------------------------
    def problem(self, kind: str, detail: str) -> None:
        """Bad or unusable input: counted, and logged the first time for this peer."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._warn_once(kind, detail)

    def _warn_once(self, kind: str, detail: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("peer %s: %s: %s (further ones are counted, not logged)", self.peer, kind, detail)

    def _report(self, problems: list[Problem]) -> None:
        for item in problems:
            self.problem(f"ignored {item.kind}", item.detail)

    def _sync_framing_problems(self) -> None:
        for key, count in self.splitter.stats.as_dict().items():
            kind, detail = FRAMING_DETAILS.get(key, (key.replace("_", " "), "input was skipped"))
            if count > self.counts.get(kind, 0):
                self.problem(kind, detail)
                self.counts[kind] = count

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        log.info("peer %s connected", self.peer)
        try:
            await asyncio.sleep(self.server.config.greeting_delay)
            if self.server.config.track:
                await self.spawn(self.server.config.track)
            else:
                self.output.send({"msg_type": "scene_selection_ready", "loaded": "1"}, "event")
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._telemetry_loop(), name=f"telemetry {self.peer}")
                await self._read_loop()
                self._closed.set()
        finally:
            self._closed.set()
            self.despawn()
            writer = self.output.writer
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            dropped = {f"{kind}s dropped": n for kind, n in self.output.dropped.items() if n}
            summary = ", ".join(f"{k}: {v}" for k, v in sorted({**self.counts, **dropped}.items()))
            log.info("peer %s disconnected%s", self.peer, f" ({summary})" if summary else "")

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        tokens, refilled = INBOUND_BURST, loop.time()
        while not self._closed.is_set():
            try:
                data = await self.reader.read(READ_CHUNK)
            except (ConnectionError, OSError) as exc:
                self._ended_mid_message()
                self.problem("connection error", str(exc))
                return
            if not data:
                self._ended_mid_message()
                return
            messages = self.splitter.feed(data)
            for message in messages:
                try:
                    await self.handle(message)
                except ProtocolError as exc:
                    self.problem(f"invalid {message.get('msg_type', 'message')}", str(exc))
            self._sync_framing_problems()
            now = loop.time()
            tokens = min(INBOUND_BURST, tokens + (now - refilled) * INBOUND_UNITS_PER_S)
            refilled = now
            tokens -= max(len(messages), len(data) / 1024)
            if tokens < 0:  # over budget: read this peer more slowly
                self.problem("inbound flood", f"over {INBOUND_UNITS_PER_S:.0f} messages (or KiB) a second; "
                                              "reading this peer more slowly")
                await asyncio.sleep(-tokens / INBOUND_UNITS_PER_S)
            else:
                await asyncio.sleep(0)  # a busy peer yields each chunk to the other cars

    def _ended_mid_message(self) -> None:
        if self.splitter.pending_bytes:
            self.problem("disconnected mid-message", f"{self.splitter.pending_bytes} bytes unfinished")

    # -- the car ----------------------------------------------------------------------------
    async def spawn(self, scene_name: str, road_seed: int | None = None) -> None:
        """Load a scene (a new car); loads are spaced ``load_interval`` apart per peer."""
        loop = asyncio.get_running_loop()
        wait = self._last_load + self.server.config.load_interval - loop.time()
        if wait > 0:  # a flood of load_scene waits here, and TCP stops the peer's sending
            self.problem("load_scene flood", f"scene loads are spaced {self.server.config.load_interval} s apart "
                                             "for each peer")
            await asyncio.sleep(wait)
        self._last_load = loop.time()
        try:
            scene = get_scene(scene_name)
        except KeyError as exc:
            fallback = self.server.config.track or "generated_track"
            self.problem("unknown scene", f"{exc.args[0]}; loading {fallback!r}")
            scene = get_scene(fallback)
        if scene.substituted:
            self._warn_once(f"scene {scene.name}", f"the twin has no {scene.name!r} geometry of its own: "
                                                   f"serving {scene.geometry!r}")
        if scene.geometry == "generated_road" and road_seed is None:
            road_seed = self.server.next_road_seed()
        self.despawn()
        car = await self.server.make_car(scene, road_seed, self.camera)
        if self._closed.is_set():
            return
        self.car = car
        self.record = self.server.register(self, scene, road_seed, car)
        self.output.send({"msg_type": "car_loaded"}, "event")
        log.info("peer %s: car %d loaded on %s (%s)", self.peer, self.record.number, scene.name,
                 car.track.description)

    def despawn(self) -> None:
        if self.record is not None:
            self.record.end()
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
                car.advance(min(MAX_STEP, now - last_step) * self.server.config.time_scale)
                last_step = now
                for crossing in car.take_crossings():
                    self.output.send({"msg_type": "collision_with_starting_line", "starting_line_index": 0,
                                      "timeStamp": crossing.time, "lap_time": crossing.lap_time or 0.0,
                                      "car_name": self.style.car_name}, "event")
                    if crossing.lap_time is not None:
                        log.info("peer %s: car %d lap %d in %.2f s", self.peer, record.number, car.stats.laps,
                                 crossing.lap_time)
                if now >= self._next_frame_at:
                    await self._send_frame(car, record)
                    self._next_frame_at = now + self.cost.min_interval() - period / 2
                else:
                    record.frames_throttled += 1
                    self._warn_once("costly camera", f"frames cost {self.cost.seconds * 1000:.0f} ms each: sent at "
                                                     f"{1 / max(period, self.cost.min_interval()):.1f} Hz, within "
                                                     "this peer's share of the CPU")
            else:
                last_step = None
            deadline += period
            now = loop.time()
            if deadline < now:  # late (or a slow frame): skip the missed ticks instead of bunching them
                missed = math.floor((now - deadline) / period) + 1
                deadline += missed * period
                if record is not None and car is not None:
                    record.frames_skipped += missed

    async def _send_frame(self, car: TwinCar, record: CarRecord) -> None:
        # Not rendered at all unless it would be written: a peer that does not read costs nothing
        # once its backlog is full.
        if not self.output.room_for("frame"):
            record.frames_dropped += 1
            self.problem("slow reader", "the peer is not reading; its frames are dropped")
            return
        camera_b = self.camera_b
        job = FrameJob(car.telemetry(), self.camera, car.render_job(self.camera), camera_b,
                       car.render_job(camera_b) if camera_b is not None else None)
        line = await self.server.frames.finish(job, self.cost)
        if self.car is not car:  # the scene changed while the frame was made
            return
        if self.output.send_line(line, "frame"):
            record.frames_sent += 1
        else:
            record.frames_dropped += 1
            self.problem("slow reader", "the peer is not reading; its frames are dropped")

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
            self.output.send({"msg_type": "protocol_version", "version": PROTOCOL_VERSION}, "reply")
        elif kind == "get_scene_names":
            self.output.send({"msg_type": "scene_names", "scene_names": self.server.scene_names}, "reply")
        elif kind == "load_scene":
            await self.spawn(text(message, "scene_name"))
        elif kind == "regen_road":
            await self._regen_road(message)
        elif kind == "reset_car":
            if car is not None:
                car.reset()
        elif kind == "exit_scene":
            self.despawn()
            self.output.send({"msg_type": "scene_selection_ready", "loaded": "1"}, "event")
        elif kind == "quit_app":
            log.info("peer %s sent quit_app", self.peer)
            self._closed.set()
            if self.server.config.exit_on_quit:
                self.server.request_stop("quit_app from " + self.peer)
        elif kind == "car_config":
            self.style, problems = apply_car_config(message, self.style)
            self._report(problems)
        elif kind == "racer_info":
            self.style, problems = apply_racer_info(message, self.style)
            self._report(problems)
        elif kind in ("cam_config", "cam_config_b"):
            self._configure_camera(kind, message)
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
                self.output.send({"msg_type": "node_position", "index": index, "pos_x": x, "pos_y": 0.0,
                                  "pos_z": z, "Qx": 0.0, "Qy": math.sin(heading / 2), "Qz": 0.0,
                                  "Qw": math.cos(heading / 2)}, "reply")
        else:
            # lidar_config, step_mode, ping and anything newer: accepted, ignored.
            log.debug("peer %s: ignoring %s", self.peer, kind)

    def _configure_camera(self, kind: str, message: dict[str, Any]) -> None:
        """Unity's per-field ``cam_config``; the size capped per peer. Renderers are built by the pool."""
        max_pixels = self.server.config.max_camera_pixels
        if kind == "cam_config":
            self.camera, problems = apply_cam_config(message, self.camera, max_pixels=max_pixels)
        else:
            self.camera_b, problems = apply_cam_config(message, self.camera_b or CameraConfig(),
                                                       max_pixels=max_pixels)
        self._report(problems)
        self.cost.reset(self.camera, self.camera_b)
        self._next_frame_at = -math.inf

    async def _regen_road(self, message: dict[str, Any]) -> None:
        """Unity's ``regen_road``: a new road from ``rand_seed``, in the generated-road scene only."""
        record = self.record
        if record is None or record.scene.geometry != "generated_road":
            log.debug("peer %s: regen_road outside generated_road ignored", self.peer)
            return
        seed = int(number(message, "rand_seed", 0.0)) if "rand_seed" in message else self.server.next_road_seed()
        await self.spawn(record.scene.name, road_seed=seed)
