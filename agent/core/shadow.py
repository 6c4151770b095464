"""The drive thread's side of a shadow trial: each decided frame offered to a candidate model, never waited on.

A shadow trial runs a candidate model beside the active one on the same live frames, on its own thread and
interpreter (agent/rollout/shadow.py). The drive thread's whole part is ``offer``: it stores one reference (the
newest frame with the active model's answer) and bumps an eventfd, a non-blocking system call with no Python
lock, so a slow or stuck shadow can never delay a cycle. The shadow takes the newest offer when it is ready; the
offers it never saw are counted as skipped, not queued.
"""

from __future__ import annotations

import contextlib
import os
import select
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from agent.core.decide import Inference
from agent.hw.interfaces import Frame


@dataclass(frozen=True, slots=True)
class Offer:
    seq: int
    image: NDArray[np.uint8]  # the frame's own array: nobody writes to a frame once the camera hands it over
    imu: NDArray[np.floating] | None
    angle: float  # the active model's answer on it
    throttle: float
    invoke_s: float


class ShadowTap:
    """One slot from the drive thread (the only writer) to a shadow thread (the only reader)."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.latest: Offer | None = None
        self.offered = 0  # written by the drive thread only

    def offer(self, frame: Frame, inference: Inference) -> None:
        """Called by the drive thread after a successful inference."""
        self.latest = Offer(frame.seq, frame.image, frame.imu, inference.angle, inference.throttle, inference.invoke_s)
        self.offered += 1
        # OSError only when the counter is full (2**64 - 1 unread): the reader finds the latest offer anyway
        with contextlib.suppress(OSError):
            os.eventfd_write(self._fd, 1)

    def take(self, timeout: float) -> Offer | None:
        """The newest offer since the last take, or None after ``timeout`` s (the shadow thread's side)."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return None
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            return None
        return self.latest

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
