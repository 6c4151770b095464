"""When the drive loop runs a cycle, and when that cycle's output goes to the actuators.

Three pacings (``drive.pacing``):

- ``locked`` (default): the loop is phase-locked to the camera's clock (agent/core/phaselock.py) and has one
  output slot per predicted frame: the predicted frame time plus an adaptive offset (the frames' p99 lateness
  as the loop receives them, plus the cycle's p99.9 compute time, plus a margin, bounded by configuration;
  ``ArrivalGuard``, ``AdaptiveDelay``). Each slot is written on time: with its own frame if it came by the
  slot's cut-off, else with the newest unused one, else holding the last decision (counted); only a decision
  that overruns its own budget goes out late. Until the lock is acquired (and after a gap, until it is
  acquired again) it paces like ``camera``.
- ``camera``: a cycle per frame, the output at the frame's timestamp plus ``output_delay_ms``.
- ``timer``: absolute deadlines at ``rate_hz``, the newest unused frame, the output at the tick plus
  ``output_delay_ms``.

Whatever the pacing, a pacer blocks rather than spins: with no frame it wakes at the moment the newest frame
turns stale and then once a period, and never starts two cycles within half a period (locked: never two in one
slot). Each pacer also keeps
the drive thread's promise to the dead-man monitor (``promise``): the latest moment its next cycle will end.
"""

from __future__ import annotations

import math
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
    """The output offset from the locked tick: guard + compute p99.9 + margin, within [minimum, maximum].

    ``observe`` takes each cycle's compute time (frame in hand to decision ready); the percentile is
    recomputed every ``update_every`` cycles from the last ``window``, so the loop never sorts per cycle.
    """

    def __init__(self, *, margin: float, maximum: float, minimum: float = 0.0, percentile: float = 99.9,
                 window: int = 400, update_every: int = 20, slew: float = 0.00005) -> None:
        self.margin, self.maximum, self.minimum = margin, maximum, minimum
        self.slew = slew  # the most the offset moves per cycle once set: a change is a period error
        # 99.9, not 99: a decision that overruns its budget is written late (a period error), so the budget covers
        # all but the rarest cycles; on a tight compute distribution this costs a fraction of a millisecond.
        self.percentile = percentile
        self.update_every = update_every
        self._samples: deque[float] = deque(maxlen=window)
        self._since_update = 0
        self.compute_high = 0.0
        self.offset = maximum  # until measured: the most the configuration allows
        self._set = False

    def observe(self, compute_s: float) -> None:
        self._samples.append(compute_s)
        self._since_update += 1
        if self._since_update >= self.update_every:
            self._since_update = 0
            self.compute_high = float(np.percentile(np.fromiter(self._samples, dtype=np.float64), self.percentile))

    def budget(self) -> float:
        """How long before its slot a cycle must have its frame: the compute p99.9 plus half the margin (the other
        half is the frame's: a camera with no measurable jitter still delivers a hair after its predicted time).
        Until the compute time is measured, half the largest offset."""
        return (self.compute_high if self.compute_high > 0.0 else self.maximum / 2) + self.margin / 2

    def current(self, guard: float | None) -> float:
        """The offset for this cycle: jumps to its target once (when the compute time and the guard are both
        measured; until then the most the configuration allows), then moves at most ``slew`` a cycle."""
        if self.compute_high <= 0.0 or guard is None:
            return self.offset
        target = min(self.maximum, max(self.minimum, guard + self.compute_high + self.margin))
        if not self._set:
            self.offset, self._set = target, True
        else:
            self.offset += max(-self.slew, min(self.slew, target - self.offset))
        return self.offset


class ArrivalGuard:
    """How late after its predicted time a frame reaches the loop: a high percentile over a window.

    Measured where it matters, when the drive thread has the frame in hand, not at its timestamp: between the
    two lie the camera stack's decoding and hand-over, which a guard on timestamps alone would leave out.
    Early frames count as zero lateness (they wait for their slot). Recomputed every ``update_every`` frames,
    never per cycle, and read by other threads only as one float.
    """

    def __init__(self, initial: float, *, percentile: float = 99.0, window: int = 200, update_every: int = 10,
                 settle: int = 8, minimum_samples: int = 24) -> None:
        self.initial = initial
        self.value = initial
        self.percentile = percentile
        self.update_every = update_every
        self.settle = settle  # frames ignored after (re)locking: the lock's first predictions are still rough
        self.minimum_samples = minimum_samples  # before this many, the guard is not trusted (``ready``)
        self._samples: deque[float] = deque(maxlen=window)
        self._since_update = 0
        self._seen = 0

    @property
    def ready(self) -> bool:
        return len(self._samples) >= self.minimum_samples

    def observe(self, lateness: float) -> None:
        self._seen += 1
        if self._seen <= self.settle:
            return
        self._samples.append(max(0.0, lateness))
        self._since_update += 1
        if self.ready and self._since_update >= self.update_every:
            self._since_update = 0
            self.value = float(np.percentile(np.fromiter(self._samples, dtype=np.float64), self.percentile))

    def reset(self) -> None:
        self._samples.clear()
        self._since_update = self._seen = 0
        self.value = self.initial


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
    """Phase-locked to the camera: one output slot per predicted frame, each written on time.

    Slot ``n`` is the predicted time of frame ``n`` plus the adaptive offset. The cycle for a slot waits for
    frame ``n`` until the slot's cut-off (the slot minus the compute budget), decides on the newest frame it
    has, and writes at the slot. A frame later than the cut-off (a loaded camera, a reader thread that was not
    scheduled) does not move the output: the slot goes out on time with the newest unused frame, or with the
    last decision held if there is none (counted), and the late frame is used at the next slot unless a newer
    one supersedes it. Output timing thus never depends on another thread being on time; only a decision that
    overruns its own budget is written late (counted).
    """

    def __init__(self, config: DriveConfig, read: ReadFrame, promise: Callable[[float], None],
                 clock: Callable[[], float], deadman_limit: float, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(config, read, promise, clock, deadman_limit, sleep)
        self.lock = PhaseLock(self.period)  # the camera runs at the drive rate; the lock finds its true period
        self.delay = AdaptiveDelay(margin=config.output_margin_ms / 1000.0,
                                   maximum=min(config.output_delay_max_ms / 1000.0, 0.8 * self.period))
        self.late_frames = 0  # frames that came after their slot's cut-off (used at a later slot, or superseded)
        self.held_outputs = 0  # slots written with no new frame: the last decision held, the phase kept
        self.late_outputs = 0  # decisions ready after their slot (written at once)
        self.skipped_slots = 0  # slots the loop could no longer reach when it got to them
        self.guard = ArrivalGuard(self.lock.guard())
        self._handover = 0.0  # the usual delay from a frame's timestamp to the loop having it (filtered)
        self.offset = self.delay.maximum
        self._served = -1  # the frame number of the last slot written
        self._slot = 0.0  # this cycle's output time, and when the cycle woke (for late_outputs)
        self._woke = 0.0

    def start(self, first: Frame) -> None:
        self.lock.observe(first.seq, first.timestamp)

    def _observe(self, frame: Frame, in_hand: float | None) -> None:
        """A frame the loop has in hand: how late it came against the lock's prediction, then into the lock.

        ``in_hand`` is when the loop got the frame, if it came while the loop waited (exact); a frame that was
        already waiting (a late one) came at an unknown moment since the last look, so its lateness is taken from
        its timestamp plus the usual hand-over delay (timestamp to in hand) instead: the time the loop spent
        writing a slot must not count as the camera's lateness."""
        lock = self.lock
        if lock.locked:
            due = lock.predict(frame.seq)
            if in_hand is not None:
                self._handover += 0.1 * (in_hand - frame.timestamp - self._handover)
                self.guard.observe(in_hand - due)
            else:
                self.guard.observe(frame.timestamp + self._handover - due)
        lock.observe(frame.seq, frame.timestamp)
        if not lock.locked:
            self.guard.reset()

    def computed(self, seconds: float) -> None:
        self.delay.observe(seconds)
        if self._slot and self._woke + seconds > self._slot:
            self.late_outputs += 1

    def _next_slot(self, now: float) -> tuple[int, float]:
        """The first slot after the one last served that can still be written on time: (frame number, due)."""
        lock = self.lock
        seq = max(self._served, lock.seq) + 1
        due = lock.predict(seq)
        behind = now + 0.0002 - (due + self.offset)
        if behind > 0:
            skip = math.floor(behind / lock.period) + 1
            self.skipped_slots += skip
            seq, due = seq + skip, due + skip * lock.period
        return seq, due

    def wait(self, last_seq: int, frame_time: float, last_cycle: float) -> Wake:
        lock, clock = self.lock, self.clock
        self._slot = 0.0
        if not lock.locked:  # acquiring (or re-acquiring after a gap): camera pacing meanwhile
            self._served = -1
            frame, error = self._wait_camera(last_seq, frame_time, last_cycle)
            if frame is not None and frame.seq > last_seq:
                lock.observe(frame.seq, frame.timestamp)
                return Wake(frame, error, frame.timestamp + self.output_delay if self.output_delay else 0.0)
            return Wake(frame, error, 0.0)
        now = clock()
        self.offset = self.delay.current(self.guard.value if self.guard.ready else None)
        seq, due = self._next_slot(now)
        slot = due + self.offset
        cutoff = max(now, slot - self.delay.budget())
        stale_at = frame_time + self.max_age + 0.001
        deadline = min(cutoff, stale_at) if stale_at > now else cutoff
        self.promise(slot + self.deadman_limit)
        frame, error = self.read(last_seq, 0.0)  # a late frame for an earlier slot, already waiting?
        waited = frame is None or frame.seq <= last_seq
        if waited and not error:
            frame, error = self.read(last_seq, deadline - now)
        if frame is not None and last_seq < frame.seq < seq:
            # A late frame for an earlier slot. The lock and the guard observe it (a guard that never saw late
            # frames would never learn how late they come); this slot still waits for its own frame until the
            # cut-off, and decides on the late one only if its own does not come.
            self.late_frames += 1
            self._observe(frame, clock() if waited else None)
            if not lock.locked:
                return Wake(frame, error, 0.0)
            newer, newer_error = self.read(frame.seq, deadline - clock())
            if newer is not None and newer.seq > frame.seq:
                frame, error = newer, newer_error
                self._observe(frame, clock())
        elif frame is not None and frame.seq > last_seq:
            self._observe(frame, clock() if waited else None)
        woke = clock()
        self._served = seq
        if frame is None or frame.seq <= last_seq:
            if woke < deadline:  # the camera gave up early (closed, failing): keep to the slots
                sleep_coarse(deadline, clock, self.sleep)
            self.held_outputs += 1
            return Wake(frame, error, slot)
        if not lock.locked:  # this frame broke the lock (a gap, a jump): no phase to write on
            return Wake(frame, error, 0.0)
        self._slot, self._woke = slot, woke
        return Wake(frame, error, slot)

    def status(self) -> dict[str, Any]:
        lock = self.lock.status()
        return {"locked": lock.locked, "camera_period_ms": round(lock.period_s * 1000, 3),
                "camera_jitter_ms": lock.jitter_ms, "jitter_guard_ms": round(self.guard.value * 1000, 3),
                "output_offset_ms": round(self.offset * 1000, 3),
                "compute_high_ms": round(self.delay.compute_high * 1000, 3), "frames_dropped_by_camera":
                lock.dropped_frames, "relocks": lock.relocks, "late_frames": self.late_frames,
                "held_outputs": self.held_outputs, "late_outputs": self.late_outputs,
                "skipped_slots": self.skipped_slots}


def make_pacer(config: DriveConfig, read: ReadFrame, promise: Callable[[float], None],
               clock: Callable[[], float], deadman_limit: float) -> CameraPacer | TimerPacer | LockedPacer:
    if config.pacing == "timer":
        return TimerPacer(config, read, promise, clock, deadman_limit)
    if config.pacing == "locked":
        return LockedPacer(config, read, promise, clock, deadman_limit)
    return CameraPacer(config, read, promise, clock, deadman_limit)


