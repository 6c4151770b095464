"""The small interfaces every hardware backend implements; the twin is one implementation of each.

Backends never decide safety: they move frames in and pulses out, and raise ActuatorError
when the hardware does not take a command. The drive core does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from agent.hw.errors import ActuatorError

__all__ = ["ActuatorError", "Actuators", "Camera", "Frame"]


@dataclass(frozen=True, slots=True)
class Frame:
    seq: int  # increases by one per frame captured; a gap means frames were dropped
    timestamp: float  # capture time on time.monotonic()
    image: NDArray[np.uint8]  # (H, W, 3) RGB; the consumer owns it (backends never reuse the array)
    imu: NDArray[np.float64] | None = None  # acl_x, acl_y, acl_z, gyr_x, gyr_y, gyr_z where available


class Camera(Protocol):
    def read(self, after_seq: int, timeout: float) -> Frame | None:
        """The newest frame with ``seq > after_seq``, waiting up to ``timeout`` s; None if there is none."""
        ...

    def close(self) -> None: ...


class Actuators(Protocol):
    def arm(self) -> None:
        """Start output at neutral throttle and centred steering (never a calibration sweep)."""
        ...

    def write(self, steering: float, throttle: float) -> None:
        """Steering and throttle in [-1, 1]; raises ActuatorError."""
        ...

    def neutral(self) -> None:
        """Centred steering, neutral throttle; raises ActuatorError."""
        ...

    def close(self) -> None: ...
