"""The in-process twin: one car on one track, with lap counting and drive statistics.

``TwinCar`` is the API that the protocol server, the expert pilot and fast data
generation share: set controls, ``advance(dt)`` the physics, ``render()`` a frame. It
never sleeps, so it runs as fast as the machine allows when no one paces it.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulator import physics
from simulator.render import CameraConfig, CameraRenderer, Randomization, shared_texture
from simulator.track import Track, get_track

NOISE_BANK_FRAMES = 8  # precomputed noise frames, offset randomly per frame (cheap camera noise)
MAX_RENDERERS = 4  # camera configurations kept per car: a client cycling through sizes costs no memory


@dataclass
class DriveStats:
    """What happened to one car: the basis of ``--summary`` and of every drive test."""

    laps: int = 0  # completed laps: start-line crossings after the first one since a reset
    lap_times: list[float] = field(default_factory=list)
    line_crossings: int = 0  # every crossing of the start line, the first included
    off_track_events: int = 0
    distance: float = 0.0  # metres driven (absolute)
    driving_time: float = 0.0  # simulated seconds
    max_abs_cte: float = 0.0
    _cte_integral: float = 0.0
    resets: int = 0

    @property
    def mean_abs_cte(self) -> float:
        return self._cte_integral / self.driving_time if self.driving_time > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "laps": self.laps,
            "line_crossings": self.line_crossings,
            "lap_times": [round(t, 3) for t in self.lap_times],
            "best_lap": round(min(self.lap_times), 3) if self.lap_times else None,
            "off_track_events": self.off_track_events,
            "max_abs_cte": round(self.max_abs_cte, 4),
            "mean_abs_cte": round(self.mean_abs_cte, 4),
            "distance_m": round(self.distance, 2),
            "driving_time_s": round(self.driving_time, 2),
            "resets": self.resets,
        }


@dataclass(frozen=True)
class LineCrossing:
    """One crossing of the start line: what the protocol's ``collision_with_starting_line`` reports."""

    time: float  # simulated seconds since the scene loaded (the message's timeStamp)
    lap_time: float | None  # the lap it completes; None for the first crossing since a reset


class TwinCar:
    """One simulated car. Deterministic for a given track, seed and control sequence."""

    def __init__(
        self,
        track: Track | str = "generated_track",
        *,
        seed: int = 0,
        camera: CameraConfig | None = None,
        randomization: Randomization | None = None,
        limits: physics.CarLimits | None = None,
    ) -> None:
        self.track = get_track(track) if isinstance(track, str) else track
        self.seed = seed
        self.randomization = randomization or Randomization()
        self.limits = limits or physics.CarLimits()
        self._rng = np.random.default_rng(seed)
        self._texture = shared_texture(self.track, seed, self.randomization.texture)
        self._renderers: OrderedDict[CameraConfig, CameraRenderer] = OrderedDict()  # most recent last
        self._noise_bank: NDArray[np.float32] | None = None  # made on first use, when noise is on
        self.camera = camera or CameraConfig()
        self.stats = DriveStats()
        self.state = physics.CarState()
        self.steering = 0.0
        self.throttle = 0.0
        self.brake = 0.0
        self.time = 0.0  # seconds since the scene loaded (the protocol's `time`)
        self.reset()

    # -- controls and pose -------------------------------------------------------------
    def set_controls(self, steering: float, throttle: float, brake: float = 0.0) -> None:
        """Commands as the protocol's `control`, clamped like the Unity simulator."""
        self.steering = max(-1.0, min(1.0, steering))
        self.throttle = max(-1.0, min(1.0, throttle))
        self.brake = max(0.0, min(1.0, brake))

    def reset(self) -> None:
        """Back to the start line, controls zeroed and brake on (as `reset_car`)."""
        x, z, heading = self.track.point_at(0.0)
        self.state = physics.CarState(x=x, z=z, yaw=heading % (2 * math.pi))
        self.set_controls(0.0, 0.0, 1.0)
        projection = self.track.project(x, z)
        self._node = projection.node
        self._progress = projection.progress
        self._unwrapped = 0.0  # progress along the track since the last reset, metres
        self._crossings_since_reset = 0  # the next crossing is at _crossings_since_reset * length
        self._last_crossing: float | None = None
        self._pending_crossings: deque[LineCrossing] = deque(maxlen=64)  # drained by the server
        self.cte = projection.cte
        self.off_track = False
        self._gain = 1.0
        if self.randomization.lighting > 0:
            spread = self.randomization.lighting
            self._gain = float(self._rng.uniform(1 - spread, 1 + spread))
        if self.time > 0:
            self.stats.resets += 1

    def set_pose(self, x: float, z: float, yaw: float | None = None) -> None:
        """Teleport (the protocol's `set_position`); keeps lap progress consistent."""
        self.state.x, self.state.z = x, z
        if yaw is not None:
            self.state.yaw = yaw % (2 * math.pi)
        self.state.speed = 0.0
        projection = self.track.project(x, z)
        self._node, self._progress, self.cte = projection.node, projection.progress, projection.cte
        # A teleport never crosses the line: the next crossing is where driving forward next
        # meets the start line, a track length minus the progress ahead (as Unity's trigger).
        self._unwrapped = (self._crossings_since_reset - 1) * self.track.length + projection.progress

    # -- simulation --------------------------------------------------------------------
    def advance(self, dt: float) -> int:
        """Step the physics by ``dt`` seconds; returns how many laps were completed."""
        if dt <= 0:
            return 0
        was_x, was_z = self.state.x, self.state.z
        physics.step(
            self.state, self.steering, self.throttle, self.brake, dt,
            limits=self.limits, offroad=self.off_track,
        )
        self.time += dt
        projection = self.track.project(self.state.x, self.state.z, hint=self._node)
        delta = projection.progress - self._progress
        half = self.track.length / 2
        delta = (delta + half) % self.track.length - half  # wrapped progress change
        self._node, self._progress, self.cte = projection.node, projection.progress, projection.cte

        stats = self.stats
        stats.distance += math.hypot(self.state.x - was_x, self.state.z - was_z)
        stats.driving_time += dt
        stats._cte_integral += abs(self.cte) * dt
        stats.max_abs_cte = max(stats.max_abs_cte, abs(self.cte))
        off = abs(self.cte) > self.track.half_width
        if off and not self.off_track:
            stats.off_track_events += 1
        self.off_track = off

        # The start line is crossed when forward progress since the reset passes a multiple of
        # the track length (0 included: the car starts on the line), each multiple once, so
        # reversing across the line and back never counts twice. As Unity's start-line trigger,
        # every crossing is reported; the first one starts the lap clock.
        self._unwrapped += delta
        laps = 0
        length = self.track.length
        while self._unwrapped > self._crossings_since_reset * length:
            self._crossings_since_reset += 1
            stats.line_crossings += 1
            lap_time = None if self._last_crossing is None else self.time - self._last_crossing
            if lap_time is not None:
                stats.laps += 1
                stats.lap_times.append(lap_time)
                laps += 1
            self._last_crossing = self.time
            self._pending_crossings.append(LineCrossing(self.time, lap_time))
        return laps

    def take_crossings(self) -> list[LineCrossing]:
        """The start-line crossings since the last call (the server reports each one)."""
        crossings = list(self._pending_crossings)
        self._pending_crossings.clear()
        return crossings

    @property
    def progress(self) -> float:
        """Arc length along the track from the start line, metres."""
        return self._progress

    @property
    def node(self) -> int:
        return self._node

    # -- sensors -----------------------------------------------------------------------
    def renderer(self, camera: CameraConfig | None = None) -> CameraRenderer:
        config = camera or self.camera
        renderer = self._renderers.get(config)
        if renderer is None:
            renderer = CameraRenderer(self._texture, config)
            self._renderers[config] = renderer
            while len(self._renderers) > MAX_RENDERERS:
                self._renderers.popitem(last=False)
        else:
            self._renderers.move_to_end(config)
        return renderer

    def render(self, camera: CameraConfig | None = None) -> NDArray[np.uint8]:
        """The camera frame for the current pose, (H, W, 3) uint8 RGB."""
        return self.render_job(camera)()

    def render_job(self, camera: CameraConfig | None = None) -> Callable[[], NDArray[np.uint8]]:
        """The frame of the current pose, to render later (on a worker thread): the pose is copied now.

        Cameras that are rendered concurrently must come from different cars: a renderer
        reuses its buffers, so one car renders one frame at a time.
        """
        config = camera or self.camera
        x, z, yaw, gain = self.state.x, self.state.z, self.state.yaw, self._gain
        noise = self._noise(config) if self.randomization.noise > 0 else None

        def render() -> NDArray[np.uint8]:
            return self.renderer(config).render(x, z, yaw, gain=gain, noise=noise)

        return render

    def _noise(self, config: CameraConfig) -> NDArray[np.float32]:
        bank = self._noise_bank
        size = config.width * config.height * 3
        if bank is None or bank.size < size * 2:
            normal = self._rng.normal(0, self.randomization.noise, size=size * NOISE_BANK_FRAMES)
            self._noise_bank = bank = normal.astype(np.float32)
        start = int(self._rng.integers(0, bank.size - size))
        return bank[start : start + size]

    def telemetry(self) -> dict[str, Any]:
        """Telemetry fields without the image, named and scaled as the Unity simulator's.

        Units are metres, m/s, m/s² and rad/s for a 1/10-scale car (the Unity simulator
        divides its world units by 8 for the same purpose; see docs/twin.md).
        """
        state = self.state
        vel_x, vel_z = state.velocity
        yaw_deg = math.degrees(state.yaw) % 360.0
        # World-frame acceleration from the car-frame forward and lateral components.
        sin_yaw, cos_yaw = math.sin(state.yaw), math.cos(state.yaw)
        accel_x = state.accel_forward * sin_yaw + state.accel_lateral * cos_yaw
        accel_z = state.accel_forward * cos_yaw - state.accel_lateral * sin_yaw
        return {
            "msg_type": "telemetry",
            "steering_angle": self.steering,
            "throttle": self.throttle,
            "speed": abs(state.speed),
            "hit": "track_edge" if self.off_track else "none",
            "time": self.time,
            "accel_x": accel_x,
            "accel_y": 0.0,
            "accel_z": accel_z,
            "gyro_x": 0.0,
            "gyro_y": state.yaw_rate,
            "gyro_z": 0.0,
            "pitch": 0.0,
            "yaw": yaw_deg,
            "roll": 0.0,
            "cte": self.cte,
            "activeNode": self._node,
            "totalNodes": self.track.node_count,
            "pos_x": state.x,
            "pos_y": 0.0,
            "pos_z": state.z,
            "vel_x": vel_x,
            "vel_y": 0.0,
            "vel_z": vel_z,
        }
