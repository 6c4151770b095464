"""The twin backends: camera and actuators over one Donkey simulator protocol connection.

The same code drives our twin and the Unity Donkey simulator.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from agent.hw.donkeysim.client import SimClient, SimError
from agent.hw.interfaces import ActuatorError, Frame


class TwinLink:
    """One car on a simulator; shared by TwinCamera and TwinActuators. ``close`` is idempotent."""

    def __init__(self, host: str, port: int, *, scene: str, width: int = 160, height: int = 120,
                 connect_timeout: float = 15.0, car_name: str = "donkey-agent") -> None:
        self.client = SimClient(host, port, scene=scene, camera={"img_w": width, "img_h": height},
                                car_name=car_name, connect_timeout=connect_timeout)
        self._lock = threading.Lock()
        self._connected = False

    def connect(self) -> TwinLink:
        with self._lock:
            if not self._connected:
                self.client.connect()
                self._connected = True
        return self

    def close(self) -> None:
        with self._lock:
            if self._connected:
                self.client.close()
                self._connected = False


class TwinCamera:
    def __init__(self, link: TwinLink) -> None:
        self.link = link.connect()

    def read(self, after_seq: int, timeout: float) -> Frame | None:
        telemetry = self.link.client.wait_next(after_seq, timeout)
        if telemetry is None or telemetry.image is None:
            return None
        fields = telemetry.fields
        imu = np.array([fields.get(k, 0.0) for k in ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")],
                       dtype=np.float64)
        return Frame(telemetry.seq, telemetry.received, telemetry.image, imu)

    def close(self) -> None:
        self.link.close()


class TwinActuators:
    def __init__(self, link: TwinLink) -> None:
        self.link = link.connect()

    def arm(self) -> None:
        self.neutral()

    def write(self, steering: float, throttle: float) -> None:
        try:
            self.link.client.send_control(steering, throttle)
        except (OSError, SimError) as exc:
            raise ActuatorError(f"simulator link: {exc}") from exc

    def neutral(self) -> None:
        try:
            self.link.client.send_control(0.0, 0.0, 0.0)
        except (OSError, SimError) as exc:
            raise ActuatorError(f"simulator link: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(ActuatorError):
            self.neutral()
        self.link.close()
