"""Modes as in DonkeyCar, throttle limits, and the throttle ramp.

- ``user``: steering and throttle from the operator;
- ``local_angle``: the model steers, the operator controls throttle;
- ``local``: the model steers and throttles (times ``throttle_multiplier``).

Throttle is then clamped to ``max_throttle`` and ramped: |throttle| may grow by at most
``ramp_per_s`` per second, but falls (towards neutral) at once.
"""

from __future__ import annotations

import math

MODES = ("user", "local_angle", "local")
NEEDS_OPERATOR = frozenset({"user", "local_angle"})  # modes that need the manual-control heartbeat
NEEDS_PILOT = frozenset({"local_angle", "local"})


def select(
    mode: str,
    pilot_angle: float,
    pilot_throttle: float,
    user_angle: float,
    user_throttle: float,
    *,
    max_throttle: float,
    throttle_multiplier: float,
) -> tuple[float, float]:
    if mode == "user":
        steering, throttle = user_angle, user_throttle
    elif mode == "local_angle":
        steering, throttle = pilot_angle, user_throttle
    else:
        steering, throttle = pilot_angle, pilot_throttle * throttle_multiplier
    if not (math.isfinite(steering) and math.isfinite(throttle)):
        return 0.0, 0.0
    steering = max(-1.0, min(1.0, steering))
    throttle = max(-max_throttle, min(max_throttle, throttle))
    return steering, throttle


class ThrottleRamp:
    def __init__(self, ramp_per_s: float) -> None:
        self.ramp_per_s = ramp_per_s
        self.value = 0.0
        self._last: float | None = None

    def reset(self, now: float) -> None:
        self.value = 0.0
        self._last = now

    def apply(self, target: float, now: float) -> float:
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        current = self.value
        if target * current < 0:  # reversing direction: through neutral first
            current = 0.0
        if abs(target) <= abs(current):
            self.value = target
        else:
            step = self.ramp_per_s * dt
            self.value = math.copysign(min(abs(target), abs(current) + step), target)
        return self.value
