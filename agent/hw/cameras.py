"""Cameras other than the twin: tub replay, picamera2 (Raspberry Pi OS), V4L2 via OpenCV (Fedora, USB).

Each runs its capture on its own thread and publishes frames into a ``FrameSlot``: the
newest frame, its sequence number and capture time. A frame array is never reused, so the
drive core may hand it to the recorder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agent.hw.interfaces import Frame
from agent.hw.slot import LatestSlot

log = logging.getLogger(__name__)


class FrameSlot(LatestSlot[Frame]):
    """Numbers frames as they are published."""

    def publish_image(self, image: np.ndarray, timestamp: float) -> None:
        seq = 1 if self.latest is None else self.latest.seq + 1
        self.publish(Frame(seq, timestamp, image))


class _ThreadedCamera:
    """A capture thread that never dies of an error: it records it, waits (0.1 s doubling to 5 s)
    and captures again. Meanwhile no frame arrives, so the drive core's stale-frame fault holds
    the car at neutral."""

    def __init__(self, name: str) -> None:
        self.slot = FrameSlot()
        self._stop = threading.Event()
        self.error: str | None = None
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._capture_loop()
                return  # ended by itself (stop, or the end of a tub that does not loop)
            except Exception as exc:
                self.errors += 1
                self.error = f"{type(exc).__name__}: {exc}"
                if self.errors == 1:
                    log.error("camera %s failed (%s); capturing again in %.1f s", self._thread.name, self.error,
                              backoff)
                if self._stop.wait(backoff):
                    return
                backoff = min(5.0, backoff * 2)

    def _capture_loop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def read(self, after_seq: int, timeout: float) -> Frame | None:
        return self.slot.read(after_seq, timeout)

    def close(self) -> None:
        self._stop.set()
        self.slot.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)


class TubReplayCamera(_ThreadedCamera):
    """Replays a tub's images at ``fps`` on absolute deadlines (loops at the end)."""

    def __init__(self, path: Path, fps: float = 20.0, *, loop: bool = True) -> None:
        super().__init__("tub-replay")
        self.path = Path(path)
        self.period = 1.0 / fps
        self.loop = loop
        self.images = self._image_paths()
        if not self.images:
            raise ValueError(f"{self.path}: the tub has no images to replay")
        self._start()

    def _image_paths(self) -> list[Path]:
        names = []
        for catalog in sorted(self.path.glob("catalog_*.catalog"), key=lambda p: int(p.stem.split("_")[1])):
            for line in catalog.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if "cam/image_array" in record:
                        names.append(self.path / "images" / record["cam/image_array"])
        return names

    def _capture_loop(self) -> None:
        deadline = time.monotonic()
        index = 0
        while not self._stop.is_set():
            if index >= len(self.images):
                if not self.loop:
                    return
                index = 0
            with Image.open(self.images[index]) as image:
                array = np.asarray(image.convert("RGB"))
            index += 1
            deadline += self.period
            delay = deadline - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            self.slot.publish_image(array, time.monotonic())


class Picamera2Camera(_ThreadedCamera):
    """The Pi camera through picamera2 (apt: python3-picamera2), configured for low latency.

    A fixed frame duration gives the requested rate (DonkeyCar's FrameDurationLimits let it
    run at the sensor maximum); two buffers and ``flush`` captures avoid frames a period old.
    The capture time is the sensor timestamp (CLOCK_MONOTONIC), not the time we got the buffer.
    """

    def __init__(self, width: int, height: int, fps: float) -> None:
        super().__init__("picamera2")
        from agent.hw.errors import HardwareUnavailableError

        try:
            from picamera2 import Picamera2
        except ImportError:
            raise HardwareUnavailableError(
                "picamera2 is not importable: apt install python3-picamera2 and create the venv with "
                "--system-site-packages"
            ) from None
        try:
            self.camera: Any = Picamera2()
            frame_us = int(1_000_000 / fps)
            config = self.camera.create_video_configuration(
                main={"size": (width, height), "format": "BGR888"},  # BGR888 is RGB byte order in numpy
                buffer_count=2, queue=False, controls={"FrameDurationLimits": (frame_us, frame_us)})
            self.camera.configure(config)
            self.camera.start()
        except (RuntimeError, IndexError, OSError) as exc:
            raise HardwareUnavailableError(f"no camera on the CSI port: {exc}") from None
        self._start()

    def _capture_loop(self) -> None:
        while not self._stop.is_set():
            request = self.camera.capture_request(flush=True)
            try:
                image = request.make_array("main").copy()
                sensor_ns = request.get_metadata().get("SensorTimestamp")
            finally:
                request.release()
            timestamp = sensor_ns / 1e9 if sensor_ns else time.monotonic()
            self.slot.publish_image(image, timestamp)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(Exception):
            self.camera.stop()
            self.camera.close()


class V4l2Camera(_ThreadedCamera):
    """A USB (UVC) camera through OpenCV's V4L2 backend: the camera path on Fedora."""

    def __init__(self, device: str, width: int, height: int, fps: float) -> None:
        super().__init__("v4l2")
        from agent.hw.errors import HardwareUnavailableError

        try:
            import cv2
        except ImportError:
            raise HardwareUnavailableError("OpenCV is not installed: pip install opencv-python-headless") from None
        self.cv2 = cv2
        self.width, self.height = width, height
        self.capture = cv2.VideoCapture(device, cv2.CAP_V4L2)
        if not self.capture.isOpened():
            raise HardwareUnavailableError(f"cannot open {device} (is the agent's user in the video group?)")
        self.capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self.capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.capture.set(cv2.CAP_PROP_FPS, fps)
        self.capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self._start()

    def _capture_loop(self) -> None:
        cv2 = self.cv2
        while not self._stop.is_set():
            ok, bgr = self.capture.read()
            timestamp = time.monotonic()
            if not ok:
                self.error = "read failed"
                time.sleep(0.01)
                continue
            if bgr.shape[:2] != (self.height, self.width):
                bgr = cv2.resize(bgr, (self.width, self.height), interpolation=cv2.INTER_AREA)
            self.slot.publish_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), timestamp)

    def close(self) -> None:
        super().close()
        self.capture.release()
