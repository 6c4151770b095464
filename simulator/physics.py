"""A kinematic bicycle model with the limits of a 1/10-scale DonkeyCar.

Kinematic (no tyre slip model) but with the effects a pilot has to cope with: a steering
servo that takes time to move, a motor/ESC that reaches speed with a lag, braking, drag,
more rolling resistance off the road, and understeer once lateral acceleration exceeds
the grip limit (the car runs wide instead of following an impossible curve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CarLimits:
    wheelbase: float = 0.26  # m, typical 1/10 chassis
    max_steer: float = math.radians(25.0)  # front wheel angle at steering = ±1
    steer_time_constant: float = 0.05  # s, servo response
    top_speed: float = 6.0  # m/s at throttle = 1 (forward); reverse is capped lower
    reverse_speed: float = 2.0  # m/s at throttle = -1
    speed_time_constant: float = 0.6  # s, motor/ESC response to a new throttle
    max_brake: float = 6.0  # m/s² at brake = 1
    max_lateral_accel: float = 7.0  # m/s², grip limit
    offroad_drag: float = 1.5  # 1/s extra speed decay on grass


@dataclass
class CarState:
    x: float = 0.0
    z: float = 0.0
    yaw: float = 0.0  # radians, 0 = +z, clockwise positive
    speed: float = 0.0  # m/s along the heading (negative when reversing)
    wheel_angle: float = 0.0  # radians, actual (lagged) front wheel angle
    yaw_rate: float = 0.0  # rad/s
    accel_forward: float = 0.0  # m/s²
    accel_lateral: float = 0.0  # m/s², positive to the right

    @property
    def velocity(self) -> tuple[float, float]:
        return self.speed * math.sin(self.yaw), self.speed * math.cos(self.yaw)


MAX_SUBSTEP = 0.005  # s; keeps integration error far below what a pilot could notice


def step(
    state: CarState,
    steering: float,
    throttle: float,
    brake: float,
    dt: float,
    *,
    limits: CarLimits,
    offroad: bool = False,
) -> None:
    """Advance ``state`` by ``dt`` seconds under constant commands (mutates in place)."""
    if dt <= 0:
        return
    substeps = max(1, math.ceil(dt / MAX_SUBSTEP))
    h = dt / substeps
    target_wheel = max(-1.0, min(1.0, steering)) * limits.max_steer
    throttle = max(-1.0, min(1.0, throttle))
    brake = max(0.0, min(1.0, brake))
    target_speed = throttle * (limits.top_speed if throttle >= 0 else limits.reverse_speed)
    steer_blend = 1.0 - math.exp(-h / limits.steer_time_constant)
    speed_blend = 1.0 - math.exp(-h / limits.speed_time_constant)
    speed_before = state.speed
    for _ in range(substeps):
        state.wheel_angle += (target_wheel - state.wheel_angle) * steer_blend
        speed = state.speed + (target_speed - state.speed) * speed_blend
        if brake > 0:
            decel = limits.max_brake * brake * h
            speed = max(0.0, speed - decel) if speed > 0 else min(0.0, speed + decel)
        if offroad:
            speed *= math.exp(-limits.offroad_drag * h)
        state.speed = speed
        curvature = math.tan(state.wheel_angle) / limits.wheelbase
        # Past the grip limit the car cannot follow the commanded curve: it runs wide.
        grip_curvature = limits.max_lateral_accel / max(speed * speed, 1e-9)
        if abs(curvature) > grip_curvature:
            curvature = math.copysign(grip_curvature, curvature)
        state.yaw_rate = speed * curvature
        state.yaw = (state.yaw + state.yaw_rate * h) % (2 * math.pi)
        state.x += speed * math.sin(state.yaw) * h
        state.z += speed * math.cos(state.yaw) * h
    state.accel_forward = (state.speed - speed_before) / dt
    state.accel_lateral = state.speed * state.yaw_rate
