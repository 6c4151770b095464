"""Rendering and encoding telemetry frames off the event loop, so one expensive peer cannot delay another.

A frame is the costly part of a tick: the camera render, the image encoding, base64 and the
JSON line (about 1 ms at 160x120 JPEG, about 40 ms at 640x480 PNG on the machine in
docs/performance.md). They run on worker threads in two lanes: peers whose frames cost
little share the *light* lane, and a peer whose measured cost per frame is over
``HEAVY_FRAME_S`` moves to the *heavy* lane, served by its own worker. A cheap frame therefore
never waits behind an expensive one, and expensive peers share one worker among them (each
has at most one frame in flight, so they take turns). On top of that each peer's frames may
use at most ``PEER_CPU_SHARE`` of a core: a camera that costs 40 ms a frame gets about 6 frames
a second instead of 20. NumPy and Pillow release the GIL for much of the work, so the lanes
also use the second core.

The event loop keeps the physics, the protocol and the socket writes; a session hands over a
``FrameJob`` (the telemetry fields and a render closure, with the pose copied at the tick)
and awaits the encoded line.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from agent.hw.donkeysim.framing import encode
from simulator.peer_config import ENCODINGS
from simulator.render import CameraConfig

HEAVY_FRAME_S = 0.005  # a peer whose frames cost more than this (render + encode) moves to the heavy lane
PEER_CPU_SHARE = 0.25  # of one core, at most, for one peer's frames: a dearer camera gets fewer frames a second
COST_SMOOTHING = 0.3  # weight of the newest frame in a peer's cost estimate
PNG_COMPRESS_LEVEL = 1  # zlib level: 40 % cheaper than Pillow's default 6 at 640x480, 35 % larger


def estimated_cost(camera: CameraConfig) -> float:
    """A first guess of a camera's cost per frame, in seconds, before one is measured."""
    per_pixel = 6e-8 if camera.encoding == "PNG" else 3e-8
    return camera.width * camera.height * per_pixel


def encode_image(frame: NDArray[np.uint8], encoding: str) -> str:
    """A frame as the protocol carries it: base64 of a JPG, PNG or TGA file."""
    buffer = io.BytesIO()
    fmt = ENCODINGS[encoding]
    if fmt == "PNG":
        Image.fromarray(frame).save(buffer, format=fmt, compress_level=PNG_COMPRESS_LEVEL)
    else:
        Image.fromarray(frame).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class FrameJob:
    """One telemetry message to finish on a worker: the fields, and the cameras to render into it."""

    fields: dict[str, Any]
    camera: CameraConfig
    render: Callable[[], NDArray[np.uint8]]
    camera_b: CameraConfig | None = None
    render_b: Callable[[], NDArray[np.uint8]] | None = None

    def run(self) -> tuple[bytes, float]:
        """The encoded line and the CPU time it took (the thread's, not the wall clock's)."""
        started = time.thread_time()
        message = dict(self.fields)
        message["image"] = encode_image(self.render(), self.camera.encoding)
        if self.render_b is not None and self.camera_b is not None:
            image_b = encode_image(self.render_b(), self.camera_b.encoding)
            message["imageb"] = image_b  # what the Unity simulator sends
            message["image_b"] = image_b  # what gym-donkeycar reads
        line = encode(message)
        return line, time.thread_time() - started


class PeerCost:
    """A peer's smoothed cost per frame, which picks its lane."""

    def __init__(self, camera: CameraConfig, camera_b: CameraConfig | None = None) -> None:
        self.reset(camera, camera_b)

    def reset(self, camera: CameraConfig, camera_b: CameraConfig | None = None) -> None:
        self.seconds = estimated_cost(camera) + (estimated_cost(camera_b) if camera_b else 0.0)

    def add(self, seconds: float) -> None:
        self.seconds += (seconds - self.seconds) * COST_SMOOTHING

    @property
    def heavy(self) -> bool:
        return self.seconds > HEAVY_FRAME_S

    def min_interval(self, share: float = PEER_CPU_SHARE) -> float:
        """The shortest time between two of this peer's frames that keeps it within its CPU share."""
        return self.seconds / share


class FramePool:
    """The two lanes of worker threads; ``close()`` waits for the frames in flight."""

    def __init__(self, light_workers: int = 1, heavy_workers: int = 1) -> None:
        self._light = ThreadPoolExecutor(max_workers=light_workers, thread_name_prefix="twin-frame-light")
        self._heavy = ThreadPoolExecutor(max_workers=heavy_workers, thread_name_prefix="twin-frame-heavy")
        self.frames = {"light": 0, "heavy": 0}

    async def finish(self, job: FrameJob, cost: PeerCost) -> bytes:
        """Render and encode ``job`` in the lane its peer's cost calls for; updates ``cost``."""
        lane = "heavy" if cost.heavy else "light"
        executor = self._heavy if lane == "heavy" else self._light
        line, seconds = await asyncio.get_running_loop().run_in_executor(executor, job.run)
        cost.add(seconds)
        self.frames[lane] += 1
        return line

    def close(self) -> None:
        self._light.shutdown(wait=True, cancel_futures=True)
        self._heavy.shutdown(wait=True, cancel_futures=True)
