"""When the drive loop runs a cycle, and when that cycle's output goes to the actuators.

Three pacings (``drive.pacing``):

- ``locked`` (default): the loop is phase-locked to the camera's clock (agent/core/phaselock.py). It wakes for
  the frame the lock predicts, runs the cycle as soon as that frame is in hand, and writes the output at a fixed
  offset from the *predicted* frame time, not from the jittery arrival. The offset adapts: the lock's jitter
  guard plus a high percentile of the cycle's own compute time plus a margin, bounded by configuration
  (``AdaptiveDelay``). Until the lock is acquired (and after a gap, until it is acquired again) it paces like
  ``camera``.
- ``camera``: a cycle per frame, the output at the frame's timestamp plus ``output_delay_ms``.
- ``timer``: absolute deadlines at ``rate_hz``, the newest unused frame, the output at the tick plus
  ``output_delay_ms``.

Whatever the pacing, a pacer blocks rather than spins: with no frame it wakes at the moment the newest frame
turns stale and then once a period, and never starts two cycles within half a period. Each pacer also keeps
the drive thread's promise to the dead-man monitor (``promise``): the latest moment its next cycle will end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from agent.config import DriveConfig
from agent.core.phaselock import PhaseLock
from agent.core.ratekeeper import RateKeeper
from agent.hw.interfaces import Frame

MIN_SPACING = 0.5  # of a period: two cycles never start closer than this


def sleep_coarse(target: float, clock: Callable[[], float], sleep: Callable[[float], None] = time.sleep) -> None:
    """Sleep until about ``target`` without spinning (waiting for a period, not acting on time)."""
    remaining = target - clock()
    if remaining > 0:
        sleep(remaining)


class ReadFrame(Protocol):
    def __call__(self, after_seq: int, timeout: float) -> tuple[Frame | None, str]: ...


@dataclass(slots=True)
class Wake:
    """What a pacer hands the cycle: the frame (None if none arrived), a camera error, and when to write."""

    frame: Frame | None
    camera_error: str
    output_at: float  # absolute time on the core's clock to write the decision (0: at once)


class AdaptiveDelay:
    """The output offset from the locked tick: guard + compute p99 + margin, within [minimum, maximum].

    ``observe`` takes each cycle's compute time (frame in hand to decision ready); the percentile is
    recomputed every ``update_every`` cycles from the last ``window``, so the loop never sorts per cycle.
    """

    def __init__(self, *, margin: float, maximum: float, minimum: float = 0.0, percentile: float = 99.0,
                 window: int = 400, update_every: int = 20, slew: float = 0.00005) -> None:
        self.margin, self.maximum, self.minimum = margin, maximum, minimum
        self.slew = slew  # the most the offset moves per cycle once set: a change is a period error
        self.percentile = percentile
        self.update_every = update_every
        self._samples: deque[float] = deque(maxlen=window)
        self._since_update = 0
        self.compute_p99 = 0.0
        self.offset = maximum  # until measured: the most the configuration allows
        self._set = False

    def observe(self, compute_s: float) -> None:
        self._samples.append(compute_s)
        self._since_update += 1
        if self._since_update >= self.update_every:
            self._since_update = 0
            self.compute_p99 = float(np.percentile(np.fromiter(self._samples, dtype=np.float64), self.percentile))

    def current(self, guard: float) -> float:
        """The offset for this cycle: jumps to its target once (at lock), then moves at most ``slew`` a cycle."""
        if self.compute_p99 <= 0.0:
            return self.offset
        target = min(self.maximum, max(self.minimum, guard + self.compute_p99 + self.margin))
        if not self._set:
            self.offset, self._set = target, True
        else:
            self.offset += max(-self.slew, min(self.slew, target - self.offset))
        return self.offset


class Pacer:
    """The shared part: the camera read, the promise to the dead-man monitor, the stale-aware wait."""

    def __init__(self, config: DriveConfig, read: ReadFrame, promise: Callable[[float], None],
                 clock: Callable[[], float], deadman_limit: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.read = read
        self.promise = promise
        self.clock = clock
        self.sleep = sleep
        self.period = 1.0 / config.rate_hz
        self.max_age = config.max_frame_age_ms / 1000.0
        self.output_delay = config.output_delay_ms / 1000.0
        self.deadman_limit = deadman_limit
        self.keeper: RateKeeper | None = None

    def start(self, first: Frame) -> None:
        """The warm-up frame: the pacer's first observation."""

    def computed(self, seconds: float) -> None:
        """How long the cycle took from frame in hand to decision (feeds the adaptive delay)."""

    def status(self) -> dict[str, Any]:
        return {}

    def _wait_camera(self, last_seq: int, frame_time: float, last_cycle: float) -> tuple[Frame | None, str]:
        """Wake on the next frame, or the moment the newest one turns stale, and while stale once a period."""
        clock, period = self.clock, self.period
        start = clock()
        stale_at = frame_time + self.max_age
        wake_by = stale_at + 0.001 if stale_at > start else max(start, last_cycle + period)
        self.promise(wake_by + self.deadman_limit)
        frame, error = self.read(last_seq, wake_by - start)
        now = clock()
        if frame is None or frame.seq <= last_seq:
            if now < wake_by:  # the camera gave up early (closed, failing): wait out the period
                sleep_coarse(wake_by, clock, self.sleep)
        elif now < last_cycle + MIN_SPACING * period:
            sleep_coarse(last_cycle + MIN_SPACING * period, clock, self.sleep)
        return frame, error


class CameraPacer(Pacer):
    def wait(self, last_seq: int, frame_time: float, last_cycle: float) -> Wake:
        frame, error = self._wait_camera(last_seq, frame_time, last_cycle)
        fresh = frame is not None and frame.seq > last_seq
        output_at = frame.timestamp + self.output_delay if fresh and frame is not None and self.output_delay else 0.0
        return Wake(frame, error, output_at)


class TimerPacer(Pacer):
    def start(self, first: Frame) -> None:
        self.keeper = RateKeeper(self.config.rate_hz, clock=self.clock, sleep=self.sleep)

    def wait(self, last_seq: int, frame_time: float, last_cycle: float) -> Wake:
        keeper = self.keeper
        assert keeper is not None
        self.promise(keeper.next_deadline + self.deadman_limit)
        keeper.wait()
        frame, error = self.read(last_seq, 0.0)
        tick = keeper.next_deadline - self.period
        return Wake(frame, error, tick + self.output_delay if self.output_delay else 0.0)


class LockedPacer(Pacer):
    """Phase-locked to the camera: wake for the predicted frame, write at the predicted time plus the offset."""

    def __init__(self, config: DriveConfig, read: ReadFrame, promise: Callable[[float], None],
                 clock: Callable[[], float], deadman_limit: float, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(config, read, promise, clock, deadman_limit, sleep)
        self.lock = PhaseLock(self.period)  # the camera runs at the drive rate; the lock finds its true period
        self.delay = AdaptiveDelay(margin=config.output_margin_ms / 1000.0,
                                   maximum=min(config.output_delay_max_ms / 1000.0, 0.8 * self.period))
        self.late_frames = 0  # frames that came after their predicted time plus half a period
        self.late_outputs = 0  # decisions ready after their output time (written at once)
        self.offset = self.delay.maximum

    def start(self, first: Frame) -> None:
        self.lock.observe(first.seq, first.timestamp)

    def computed(self, seconds: float) -> None:
        self.delay.observe(seconds)

    def wait(self, last_seq: int, frame_time: float, last_cycle: float) -> Wake:
        lock, clock = self.lock, self.clock
        if not lock.locked:  # acquiring (or re-acquiring after a gap): camera pacing meanwhile
            frame, error = self._wait_camera(last_seq, frame_time, last_cycle)
            if frame is not None and frame.seq > last_seq:
                lock.observe(frame.seq, frame.timestamp)
                return Wake(frame, error, frame.timestamp + self.output_delay if self.output_delay else 0.0)
            return Wake(frame, error, 0.0)
        now = clock()
        _, due = lock.next_frame(max(now, frame_time + self.period / 2))
        deadline = min(due + self.period / 2, frame_time + self.max_age + 0.001)
        if deadline <= now:  # the newest frame is already stale: wait as camera pacing does
            deadline = max(now, last_cycle + self.period)
        self.promise(deadline + self.deadman_limit)
        frame, error = self.read(last_seq, deadline - now)
        woke = clock()
        if frame is None or frame.seq <= last_seq:
            if woke < deadline:
                sleep_coarse(deadline, clock, self.sleep)
            self.late_frames += 1
            return Wake(frame, error, 0.0)
        if woke < last_cycle + MIN_SPACING * self.period:  # a burst of frames: never two cycles in half a period
            sleep_coarse(last_cycle + MIN_SPACING * self.period, clock, self.sleep)
        tick = lock.predict(frame.seq)  # when this frame was due: the smooth line, not its jittery arrival
        lock.observe(frame.seq, frame.timestamp)
        if not lock.locked:  # this frame broke the lock (a gap, a jump): no phase to write on
            return Wake(frame, error, 0.0)
        self.offset = self.delay.current(lock.guard())
        output_at = tick + self.offset
        if output_at < woke:
            self.late_outputs += 1
        return Wake(frame, error, output_at)

    def status(self) -> dict[str, Any]:
        lock = self.lock.status()
        return {"locked": lock.locked, "camera_period_ms": round(lock.period_s * 1000, 3),
                "jitter_guard_ms": lock.jitter_ms, "output_offset_ms": round(self.offset * 1000, 3),
                "compute_p99_ms": round(self.delay.compute_p99 * 1000, 3), "frames_dropped_by_camera":
                lock.dropped_frames, "relocks": lock.relocks, "late_frames": self.late_frames,
                "late_outputs": self.late_outputs}


def make_pacer(config: DriveConfig, read: ReadFrame, promise: Callable[[float], None],
               clock: Callable[[], float], deadman_limit: float) -> CameraPacer | TimerPacer | LockedPacer:
    if config.pacing == "timer":
        return TimerPacer(config, read, promise, clock, deadman_limit)
    if config.pacing == "locked":
        return LockedPacer(config, read, promise, clock, deadman_limit)
    return CameraPacer(config, read, promise, clock, deadman_limit)


