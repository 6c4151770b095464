"""A scripted expert: pure pursuit on the centreline, for driving the twin and making training data.

The expert's *clean* command is what gets recorded as the label. Optional steering noise
and recovery manoeuvres only change what is *executed*, so the recorded data shows the
car off-centre together with the command that brings it back: the data an autopilot needs
to learn recovery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulator.physics import CarLimits
from simulator.track import Track

DEMO_SPEED = 1.5  # m/s; a generated_track lap takes ~29 s


@dataclass(frozen=True)
class ExpertConfig:
    speed: float = DEMO_SPEED  # cruise speed on straights, m/s
    lookahead_time: float = 0.45  # s of travel to the pursuit point
    min_lookahead: float = 0.45  # m
    max_lateral_accel: float = 2.5  # m/s², for slowing into curves
    speed_gain: float = 0.15  # throttle per m/s of speed error
    noise: float = 0.0  # std of steering noise added to the executed command
    recovery_interval: float = 0.0  # mean seconds between recovery manoeuvres (0 = none)
    recovery_offset: float = 0.6  # fraction of the half width a manoeuvre drifts to


@dataclass(frozen=True)
class Command:
    steering: float  # the expert's clean command: the label
    throttle: float
    executed_steering: float  # what is sent to the car (noise or a manoeuvre added)
    executed_throttle: float
    manoeuvre: bool  # a recovery manoeuvre is steering the car away from the line


class ExpertPilot:
    """Pure pursuit with curvature-aware speed; needs only the pose and the track geometry."""

    def __init__(
        self,
        track: Track,
        config: ExpertConfig | None = None,
        *,
        limits: CarLimits | None = None,
        seed: int = 0,
    ) -> None:
        self.track = track
        self.config = config or ExpertConfig()
        self.limits = limits or CarLimits()
        self._rng = np.random.default_rng(seed + 7919)
        self._node: int | None = None
        self._curvature = np.abs(track.curvature())
        self._manoeuvre_side = 0.0
        self._time_to_manoeuvre = self._draw_interval()
        self._noise_state = 0.0

    def _draw_interval(self) -> float:
        mean = self.config.recovery_interval
        return float(self._rng.exponential(mean)) + 1.0 if mean > 0 else math.inf

    def _target_speed(self, progress: float, speed: float) -> float:
        """Cruise speed, reduced so the lateral acceleration stays within the expert's limit."""
        horizon = max(1.0, speed * 1.2 + 0.5)  # look far enough ahead to brake in time
        first = int(progress / self.track.spacing)
        count = int(horizon / self.track.spacing)
        idx = np.arange(first, first + count) % self.track.node_count
        k = float(self._curvature[idx].max()) if count else 0.0
        if k <= 1e-6:
            return self.config.speed
        return min(self.config.speed, math.sqrt(self.config.max_lateral_accel / k))

    def command(self, x: float, z: float, yaw: float, speed: float, dt: float) -> Command:
        cfg = self.config
        projection = self.track.project(x, z, hint=self._node)
        self._node = projection.node

        # Recovery manoeuvre: pursue a line offset towards one edge for a short while.
        offset = 0.0
        if self._manoeuvre_side:
            offset = self._manoeuvre_side * cfg.recovery_offset * self.track.half_width
            if abs(projection.cte) >= abs(offset) * 0.9 or self._time_to_manoeuvre <= -1.5:
                self._manoeuvre_side = 0.0
                self._time_to_manoeuvre = self._draw_interval()
        else:
            self._time_to_manoeuvre -= dt
            if self._time_to_manoeuvre <= 0:
                self._manoeuvre_side = float(self._rng.choice([-1.0, 1.0]))
        if self._manoeuvre_side:
            self._time_to_manoeuvre -= dt

        clean_steering = self._pursue(x, z, yaw, speed, projection.progress, 0.0)
        executed = clean_steering
        if self._manoeuvre_side:
            executed = self._pursue(x, z, yaw, speed, projection.progress, offset)
        if cfg.noise > 0:
            # Smoothed (first-order) noise: real servo jitter and driver wobble are not white.
            self._noise_state += (self._rng.normal(0, cfg.noise) - self._noise_state) * min(1.0, dt / 0.15)
            executed += self._noise_state

        target = self._target_speed(projection.progress, speed)
        throttle = target / self.limits.top_speed + cfg.speed_gain * (target - speed)
        throttle = max(-1.0, min(1.0, throttle))
        return Command(
            steering=clean_steering,
            throttle=throttle,
            executed_steering=max(-1.0, min(1.0, executed)),
            executed_throttle=throttle,
            manoeuvre=bool(self._manoeuvre_side),
        )

    def _pursue(self, x: float, z: float, yaw: float, speed: float, progress: float, offset: float) -> float:
        lookahead = max(self.config.min_lookahead, abs(speed) * self.config.lookahead_time)
        tx, tz, heading = self.track.point_at(progress + lookahead)
        tx += offset * math.cos(heading)
        tz -= offset * math.sin(heading)
        dx, dz = tx - x, tz - z
        # Target in the car frame: forward along the heading, lateral to the right.
        lateral = dx * math.cos(yaw) - dz * math.sin(yaw)
        distance2 = max(dx * dx + dz * dz, 1e-6)
        curvature = 2.0 * lateral / distance2
        wheel = math.atan(curvature * self.limits.wheelbase)
        return max(-1.0, min(1.0, wheel / self.limits.max_steer))
