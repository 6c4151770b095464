"""Locking the drive loop to the camera's clock: the camera's period and phase, estimated from frame timestamps.

A camera delivers frames on its own clock (a sensor's, or a simulator's), which drifts against ours (19.9 or
20.1 Hz for a nominal 20) and jitters (a loaded simulator, a USB stack). Timer pacing ignores that clock, so its
ticks slide against the frames; camera pacing follows it, so it passes every bit of jitter to the wheels. The
phase lock does both: it models frame ``n`` as arriving at ``phase + n * period``, filters the jitter out of
that line (an alpha-beta filter on the residuals, the way a PLL tracks a carrier), and predicts when the next
frame is due. The drive loop then runs each cycle just after the predicted frame and writes its output at a
fixed offset from that smooth, predicted tick, not from the jittery arrival.

Pure and time-free: timestamps come in, predictions go out, so lock, drift, drops, gaps and jitter are tested
with synthetic frames (tests/test_phaselock.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class LockStatus:
    locked: bool
    period_s: float  # the estimated camera period
    jitter_ms: float  # the guard the loop leaves for a frame's arrival: a high percentile of its lateness
    dropped_frames: int  # sequence gaps while locked
    outliers: int  # frames far from their predicted time (not used to update the estimate)
    relocks: int  # times the lock was lost (a gap, or a run of outliers) and acquired again


class PhaseLock:
    """Tracks a camera's frame clock. ``observe`` every frame; ``next_frame`` predicts the next one."""

    def __init__(self, nominal_period: float, *, alpha: float = 0.03, beta: float = 0.00023, lock_frames: int = 8,
                 window: int = 200, guard_percentile: float = 99.0, outlier_fraction: float = 0.4,
                 max_outliers: int = 3, max_drift: float = 0.05, guard_every: int = 10) -> None:
        self.nominal = nominal_period
        # The filter's gains in steady state: how much of a residual moves the phase, and the period (per frame
        # of distance). Small, so one frame's jitter barely moves the output's phase; while acquiring the gains
        # start at the least-squares ones for the frames seen so far (a PLL's "gear shifting"), so the lock is
        # quick and then smooth. 0.03 and 0.00023: about critically damped (beta = 2 - alpha - 2 sqrt(1 - alpha)).
        self.alpha = alpha
        self.beta = beta
        self.lock_frames = lock_frames  # frames in a row within tolerance before the lock is trusted
        self.guard_percentile = guard_percentile
        self.outlier_fraction = outlier_fraction  # |residual| above this fraction of a period: an outlier
        self.max_outliers = max_outliers  # outliers in a row before the lock is dropped and acquired anew
        self.max_drift = max_drift  # the estimated period stays within this fraction of the nominal one
        self._residuals: deque[float] = deque(maxlen=window)
        # The guard is a percentile over the window: recomputed every ``guard_every`` frames on the observing
        # (drive) thread, never per cycle, and read by other threads (status) only as this one float.
        self.guard_every = guard_every
        self._guard = outlier_fraction * nominal_period / 2
        self.dropped_frames = 0
        self.outliers = 0
        self.relocks = 0
        self._reset()

    def _reset(self) -> None:
        self.period = self.nominal
        self.phase = math.nan  # the filtered time of frame ``seq``
        self.seq = -1
        self._good_in_a_row = 0
        self._outliers_in_a_row = 0
        self._residuals.clear()
        self._guard = self.outlier_fraction * self.nominal / 2
        self._since_guard = self.guard_every  # the first full window computes at once

    @property
    def locked(self) -> bool:
        return self._good_in_a_row >= self.lock_frames

    def observe(self, seq: int, timestamp: float) -> None:
        """A frame: its sequence number (gaps are dropped frames) and its capture or arrival time."""
        if self.seq < 0 or seq <= self.seq:
            self._start(seq, timestamp)
            return
        steps = seq - self.seq
        predicted = self.phase + steps * self.period
        residual = timestamp - predicted
        if abs(residual) > self.outlier_fraction * self.period:
            self.outliers += 1
            self._outliers_in_a_row += 1
            if self._outliers_in_a_row >= self.max_outliers or steps * self.period > 4 * self.nominal:
                self.relocks += self.locked
                self._start(seq, timestamp)  # a gap, or a camera that changed its clock: start again
            return
        if self.locked and steps > 1:
            self.dropped_frames += steps - 1
        self._outliers_in_a_row = 0
        self._good_in_a_row += 1
        self._residuals.append(residual)
        self._since_guard += 1
        if len(self._residuals) >= self.lock_frames and self._since_guard >= self.guard_every:
            self._since_guard = 0
            # Only lateness counts: an early frame waits for its slot, a late one misses it.
            residuals = np.fromiter(self._residuals, dtype=np.float64)
            self._guard = max(0.0, float(np.percentile(residuals, self.guard_percentile)))
        n = self._good_in_a_row
        alpha = max(self.alpha, 2 * (2 * n - 1) / (n * (n + 1)))
        beta = max(self.beta, 6 / (n * (n + 1)))
        self.phase = predicted + alpha * residual
        self.period += beta * residual / steps
        low, high = self.nominal * (1 - self.max_drift), self.nominal * (1 + self.max_drift)
        self.period = min(high, max(low, self.period))
        self.seq = seq

    def _start(self, seq: int, timestamp: float) -> None:
        self._reset()
        self.phase = timestamp
        self.seq = seq
        self._good_in_a_row = 1

    def predict(self, seq: int) -> float:
        """When frame ``seq`` is due on the filtered line (before it is observed)."""
        return self.phase + (seq - self.seq) * self.period

    def next_frame(self, after: float) -> tuple[int, float]:
        """The sequence number and predicted time of the first frame due after ``after``."""
        if self.seq < 0:
            return 0, after + self.nominal
        steps = max(1, math.floor((after - self.phase) / self.period) + 1)
        return self.seq + steps, self.phase + steps * self.period

    def guard(self) -> float:
        """How long after its predicted time a frame is still on time (s): a high percentile of its lateness."""
        return self._guard

    def status(self) -> LockStatus:
        return LockStatus(self.locked, self.period, round(self.guard() * 1000, 3), self.dropped_frames,
                          self.outliers, self.relocks)
