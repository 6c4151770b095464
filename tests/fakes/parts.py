"""A camera and actuators at the hardware boundary, backed by the in-process twin.

``TwinRig`` steps a TwinCar in real time on its own thread at the camera rate: each tick it
applies the last actuator command, advances 1/fps of physics and publishes the rendered frame.
Fault knobs: ``pause_frames`` (the camera stops delivering), ``corrupt_pixel`` (a frame with a
white top-left pixel, which makes the nan.tflite fixture produce NaN), ``fail_writes`` (the next
N actuator writes raise ActuatorError, like an I2C error).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from agent.hw.cameras import FrameSlot
from agent.hw.interfaces import ActuatorError, Frame
from simulator.world import TwinCar


class TwinRig:
    def __init__(self, track: str = "generated_track", fps: float = 20.0) -> None:
        self.car = TwinCar(track)
        self.period = 1.0 / fps
        self.slot = FrameSlot()
        self.writes: list[tuple[float, float, float]] = []  # (monotonic, steering, throttle)
        self.neutral_calls = 0
        self.armed_at: float | None = None
        self.pause_frames = threading.Event()
        self.corrupt_pixel = False
        self.fail_writes = 0
        self.hang = threading.Event()  # set: writes block until cleared (a hung I2C bus)
        self.closed = False
        self._command = (0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twin-rig", daemon=True)
        self._thread.start()

    # -- the world -----------------------------------------------------------------------------
    def _run(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            deadline += self.period
            delay = deadline - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.car.set_controls(*self._command)
            self.car.advance(self.period)
            if self.pause_frames.is_set():
                continue
            image = self.car.render()
            if self.corrupt_pixel:
                image = image.copy()
                image[0, 0] = (255, 255, 255)
            self.slot.publish_image(image, time.monotonic())

    def close(self) -> None:
        self.hang.clear()
        self._stop.set()
        self._thread.join(2)
        self.slot.close()

    # -- Camera --------------------------------------------------------------------------------
    def read(self, after_seq: int, timeout: float) -> Frame | None:
        return self.slot.read(after_seq, timeout)

    # -- Actuators -----------------------------------------------------------------------------
    def arm(self) -> None:
        self.armed_at = time.monotonic()
        self.neutral()

    def write(self, steering: float, throttle: float) -> None:
        while self.hang.is_set() and not self._stop.is_set():
            time.sleep(0.01)
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise ActuatorError("I2C: [Errno 5] Input/output error (injected)")
        self.writes.append((time.monotonic(), steering, throttle))
        self._command = (steering, throttle)

    def neutral(self) -> None:
        self.neutral_calls += 1
        self.writes.append((time.monotonic(), 0.0, 0.0))
        self._command = (0.0, 0.0)

    # -- helpers for tests -----------------------------------------------------------------------
    def writes_after(self, moment: float) -> list[tuple[float, float, float]]:
        return [w for w in self.writes if w[0] >= moment]

    def first_neutral_after(self, moment: float) -> float | None:
        for t, steering, throttle in self.writes_after(moment):
            if steering == 0.0 and throttle == 0.0:
                return t
        return None


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


__all__ = ["TwinRig", "np", "wait_for"]
