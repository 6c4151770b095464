"""A shadow trial: a candidate model beside the active one, on the same live frames, never delaying the core.

The candidate runs on its own thread and its own interpreter (LiteRT releases the GIL while it invokes), at a
lower scheduling priority than anything else in the agent, and takes the newest frame the drive thread offered
(agent/core/shadow.py): if it is slower than the camera it skips frames (counted) instead of queueing them.
It records how far its answers are from the active model's, and its own invoke times, and says whether the
configured criteria pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.core.shadow import ShadowTap

log = logging.getLogger("donkey-agent.rollout")


@dataclass(frozen=True, slots=True)
class ShadowCriteria:
    """When a candidate has proven itself in shadow (every bound must hold)."""

    min_frames: int = 200  # 10 s at 20 Hz
    max_steering_error_mean: float = 0.10  # mean |candidate - active| steering, on the [-1, 1] scale
    max_steering_error_max: float = 0.60
    max_throttle_error_mean: float = 0.10
    max_throttle_error_max: float = 0.60
    max_invoke_ms_p99: float = 40.0  # the drive core's inference budget
    max_failures: int = 0  # exceptions or non-finite outputs


class ShadowTrial:
    """Run ``candidate`` on the frames ``tap`` offers until ``stop``; ``summary`` and ``verdict`` any time."""

    def __init__(self, tap: ShadowTap, candidate: Any, criteria: ShadowCriteria, label: dict[str, Any]) -> None:
        self.tap = tap
        self.candidate = candidate
        self.criteria = criteria
        self.label = dict(label)
        self.frames = 0
        self.failures = 0
        self.last_failure = ""
        self.skipped = 0
        self._steering_sum = self._throttle_sum = 0.0
        self._steering_max = self._throttle_max = 0.0
        self._candidate_ms: deque[float] = deque(maxlen=2000)
        self._active_ms: deque[float] = deque(maxlen=2000)
        # summary() runs on other threads (telemetry): it takes one consistent snapshot of the sums and the records
        # under this lock (never the drive thread's concern: it only offers frames).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-trial", daemon=True)
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # a lower priority than the agent's other threads (never the core's)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        last_offered = self.tap.offered
        while not self._stop.is_set():
            offer = self.tap.take(0.2)
            if offer is None:
                continue
            offered = self.tap.offered
            self.skipped += max(0, offered - last_offered - 1)
            last_offered = offered
            try:
                self.candidate.prepare(offer.image, imu=offer.imu)
                started = time.perf_counter()
                self.candidate.invoke()
                invoke_ms = (time.perf_counter() - started) * 1e3
                output = self.candidate.result()
                angle, throttle = float(output.angle), float(output.throttle)
                if not (math.isfinite(angle) and math.isfinite(throttle)):
                    raise ValueError("non-finite output")
            except Exception as exc:  # a candidate that fails is a finding, never a crash
                self.failures += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"[:200]
                continue
            steering_error, throttle_error = abs(angle - offer.angle), abs(throttle - offer.throttle)
            with self._lock:
                self.frames += 1
                self._steering_sum += steering_error
                self._throttle_sum += throttle_error
                self._steering_max = max(self._steering_max, steering_error)
                self._throttle_max = max(self._throttle_max, throttle_error)
                self._candidate_ms.append(invoke_ms)
                self._active_ms.append(offer.invoke_s * 1e3)

    def summary(self) -> dict[str, Any]:
        """Agreement and timing so far (a copy; safe from any thread)."""
        with self._lock:
            n = max(self.frames, 1)
            candidate, active = list(self._candidate_ms), list(self._active_ms)
            sums = (self._steering_sum, self._throttle_sum, self._steering_max, self._throttle_max, self.frames)
        steering_sum, throttle_sum, steering_max, throttle_max, frames = sums

        def p(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 3) if values else None

        return {"model": self.label, "frames": frames, "skipped": self.skipped, "failures": self.failures,
                "last_failure": self.last_failure, "seconds": round(time.monotonic() - self.started, 1),
                "steering_error_mean": round(steering_sum / n, 4),
                "steering_error_max": round(steering_max, 4),
                "throttle_error_mean": round(throttle_sum / n, 4),
                "throttle_error_max": round(throttle_max, 4),
                "candidate_invoke_ms": {"p50": p(candidate, 50), "p99": p(candidate, 99)},
                "active_invoke_ms": {"p50": p(active, 50), "p99": p(active, 99)}}

    def verdict(self) -> tuple[bool | None, list[str]]:
        """(None, why) until enough frames; then (passed, the bounds that failed)."""
        c, s = self.criteria, self.summary()
        if self.failures > c.max_failures:
            return False, [f"{self.failures} failures (most {c.max_failures}): {self.last_failure}"]
        if self.frames < c.min_frames:
            return None, [f"{self.frames} of {c.min_frames} frames"]
        failed = [f"{name} {s[name]} > {bound}" for name, bound in (
            ("steering_error_mean", c.max_steering_error_mean), ("steering_error_max", c.max_steering_error_max),
            ("throttle_error_mean", c.max_throttle_error_mean), ("throttle_error_max", c.max_throttle_error_max))
            if s[name] > bound]
        p99 = s["candidate_invoke_ms"]["p99"]
        if p99 is not None and p99 > c.max_invoke_ms_p99:
            failed.append(f"candidate invoke p99 {p99} ms > {c.max_invoke_ms_p99} ms")
        return not failed, failed
