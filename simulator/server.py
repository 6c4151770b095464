"""The twin's TCP server: the Donkey simulator protocol, one car per connection (``session.py``).

Each connection is a session with its own world (cars do not see or hit each other). The
server owns what sessions share: the configuration, the frame pool that renders and encodes
off the event loop, world building (one at a time, off the loop), the connection limit and
the per-car records behind ``--summary``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agent.hw.donkeysim.framing import DEFAULT_MAX_OBJECT_BYTES
from simulator.frames import FramePool
from simulator.peer_config import DEFAULT_MAX_PIXELS, CarStyle
from simulator.peer_output import DEFAULT_MAX_BACKLOG
from simulator.render import CameraConfig, Randomization
from simulator.scenes import Scene, get_scene, scene_names, scene_track
from simulator.session import CarSession
from simulator.world import DriveStats, TwinCar

log = logging.getLogger("donkey-sim")
_LIBC = ctypes.util.find_library("c")


def release_freed_memory() -> None:
    """Give freed heap back to the OS (glibc's ``malloc_trim``).

    A world build allocates ~80 MB of temporaries on a worker thread; glibc keeps such memory
    in per-thread arenas, so without a trim the twin's resident memory ratchets up with every
    new generated road. Elsewhere (no glibc) this does nothing.
    """
    if _LIBC is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(_LIBC).malloc_trim(0)

DEFAULT_MAX_CONNECTIONS = 16  # what a 2-core machine serves at 20 Hz with room to spare (docs/performance.md)
MAX_CAR_RECORDS = 1000  # ended cars beyond this leave the summary (counted), the oldest first


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
    greeting_delay: float = 0.05  # s from accepting a connection to its first message (one 20 Hz frame)
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # further connections are closed at once, counted
    max_backlog: int = DEFAULT_MAX_BACKLOG  # bytes queued to a peer before its frames and replies drop
    max_camera_pixels: int = DEFAULT_MAX_PIXELS  # per camera; larger requests are scaled down
    load_interval: float = 1.0  # s between two scene loads of one peer (a flood waits; Unity takes longer)
    frame_workers: int = 0  # light-lane threads; 0: one less than the cores, at least one


@dataclass
class CarRecord:
    """One spawned car, for the summary."""

    number: int
    peer: str
    scene: Scene
    road_seed: int | None
    session: CarSession
    spawned_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    frames_sent: int = 0
    frames_skipped: int = 0  # ticks lost to a late loop or a frame still being made
    frames_dropped: int = 0  # frames the peer was too slow to take
    frames_throttled: int = 0  # ticks without a frame: the peer's camera is over its CPU share
    car: TwinCar | None = None  # while it drives; an ended car keeps only its statistics
    stats: DriveStats | None = None
    last_controls: list[float] | None = None
    style: CarStyle = field(default_factory=CarStyle)
    camera: CameraConfig = field(default_factory=CameraConfig)

    def end(self) -> None:
        """The car is gone: keep what the summary needs and let its world (texture, renderers) go."""
        if self.ended_at is None:
            self.ended_at = time.time()
        if self.car is not None:
            self.stats = self.car.stats
            self.last_controls = [round(self.car.steering, 4), round(self.car.throttle, 4)]
            self.car = None

    def close(self) -> None:
        """The session is over: freeze what the summary reads from it."""
        self.style, self.camera = self.session.style, self.session.camera

    def as_dict(self) -> dict[str, Any]:
        live = self.ended_at is None
        style = self.session.style if live else self.style
        camera = self.session.camera if live else self.camera
        end = self.ended_at or time.time()
        connected = end - self.spawned_at
        stats = self.car.stats if self.car else self.stats
        controls = [round(self.car.steering, 4), round(self.car.throttle, 4)] if self.car else self.last_controls
        return {
            "car": self.number,
            "peer": self.peer,
            "track": self.scene.name,  # the scene the client asked for
            "geometry": self.scene.geometry,  # the twin track that served it
            "road_seed": self.road_seed,
            "car_name": style.car_name,
            "racer_name": style.racer_name,
            "body_style": style.body_style,
            "camera": f"{camera.width}x{camera.height} {camera.encoding}{' grey' if camera.grayscale else ''}",
            "connected_s": round(connected, 2),
            "frames_sent": self.frames_sent,
            "frames_skipped": self.frames_skipped,
            "frames_dropped": self.frames_dropped,
            "frames_throttled": self.frames_throttled,
            "telemetry_hz": round(self.frames_sent / connected, 2) if connected > 0 else 0.0,
            "last_controls": controls,  # steering, throttle when the car ended: neutral after a safe stop
            "problems": dict(sorted(self.session.counts.items())),
            **(stats.as_dict() if stats else {}),
        }


class TwinServer:
    """Serves cars until ``request_stop``; ``summary()`` says what every car did."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cars: deque[CarRecord] = deque()
        self.cars_dropped_from_summary = 0
        self.connections_refused = 0
        self.scene_names = scene_names()
        self._numbers = itertools.count(1)
        self._road_loads = itertools.count()
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._build_lock = asyncio.Lock()
        workers = config.frame_workers or max(1, (os.cpu_count() or 2) - 1)
        self.frames = FramePool(light_workers=workers, heavy_workers=1)
        self.stop_reason = ""
        self.started_at = time.time()

    def next_road_seed(self) -> int:
        """A new generated road for every load (as Unity's), the same sequence for the same ``--seed``."""
        return (self.config.seed * 1_000_003 + next(self._road_loads)) % 2**31

    async def make_car(self, scene: Scene, road_seed: int | None, camera: CameraConfig) -> TwinCar:
        # Building a world texture takes ~0.2 s: off the event loop so the other cars keep their
        # rate, and one at a time, so a crowd of loading peers takes one core at most.
        async with self._build_lock:
            return await asyncio.to_thread(self._build_car, scene, road_seed, camera)

    def _build_car(self, scene: Scene, road_seed: int | None, camera: CameraConfig) -> TwinCar:
        track = scene_track(scene, road_seed or 0)
        car = TwinCar(track, seed=self.config.seed, camera=camera, randomization=self.config.randomization)
        release_freed_memory()
        return car

    def register(self, session: CarSession, scene: Scene, road_seed: int | None, car: TwinCar) -> CarRecord:
        record = CarRecord(number=next(self._numbers), peer=session.peer, scene=scene, road_seed=road_seed,
                           session=session, car=car)
        self.cars.append(record)
        while len(self.cars) > MAX_CAR_RECORDS and self.cars[0].ended_at is not None:
            self.cars.popleft()
            self.cars_dropped_from_summary += 1
        return record

    async def start(self) -> None:
        get_scene(self.config.track or "generated_track")
        self._server = await asyncio.start_server(self._accept, self.config.host, self.config.port)
        sockets = list(self._server.sockets)
        if sockets and self.config.port == 0:
            self.config.port = sockets[0].getsockname()[1]
        log.info("twin listening on %s:%d (%s, %.0f Hz)", self.config.host, self.config.port,
                 f"scene {self.config.track} loaded" if self.config.track else "menu", self.config.fps)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._sessions) >= self.config.max_connections:
            self.connections_refused += 1
            if self.connections_refused == 1:
                log.warning("connection refused: %d connections already (--max-connections); further refusals "
                            "are counted in the summary", self.config.max_connections)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        session = CarSession(self, reader, writer)
        try:
            await session.run()
        except asyncio.CancelledError:
            # The twin is stopping. Not re-raised: asyncio on Python 3.11 logs a cancelled
            # connection handler as an error.
            pass
        except Exception:  # a bug in one session must not take the twin down
            log.exception("session failed")
        finally:
            self._sessions.discard(task)
            for record in self.cars:
                if record.session is session:
                    record.close()

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
        await asyncio.to_thread(self.frames.close)

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
                "connections_refused": self.connections_refused,
                "cars_dropped_from_summary": self.cars_dropped_from_summary,
                "frames_by_lane": dict(self.frames.frames),
            },
            "cars": [record.as_dict() for record in self.cars],
        }
