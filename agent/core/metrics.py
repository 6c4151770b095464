"""Per-cycle timings in a preallocated ring, written by the drive thread and read by anyone.

The writer stores one row per cycle into a fixed numpy array and then bumps ``cycles``;
readers copy the rows up to a ``cycles`` value they read first. No locks, no allocation and
no logging on the writer's side. A reader racing the writer may see the one row being
overwritten; with a 1024-row ring at 20 Hz that needs a reader 50 s behind, so the
summaries simply use the most recent rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

FIELDS = (
    "start",  # cycle start, time.monotonic()
    "period_error_ms",  # |actual - nominal| interval between actuations (when each write begins)
    "frame_age_ms",  # capture to actuation
    "wait_ms",  # waiting for the frame or the tick, and for the output time
    "preprocess_ms",
    "invoke_ms",
    "actuate_ms",
    "overhead_ms",  # the loop's own work from frame in hand to the write, excluding invoke
    "deadline_miss",  # 1.0 when actuation came after the cycle's deadline
    "steering",
    "throttle",
    "actuated",  # time.monotonic() when the write to the actuators began
    "frame_seq",  # the frame this cycle acted on
    "decided",  # 1.0 when the model ran on that frame in this cycle
)
INDEX = {name: i for i, name in enumerate(FIELDS)}


class LoopMetrics:
    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.rows: NDArray[np.float64] = np.zeros((capacity, len(FIELDS)), dtype=np.float64)
        self.cycles = 0  # rows written so far (published after each row is complete)
        self.deadline_misses = 0
        self.frames_missed = 0  # cycles that found no new frame
        self.frames_dropped = 0  # sequence gaps: frames the loop never saw

    def row(self) -> NDArray[np.float64]:
        """The row to fill for the current cycle (a view; no allocation)."""
        return self.rows[self.cycles % self.capacity]

    def publish(self) -> None:
        self.cycles += 1

    def recent(self, count: int | None = None) -> NDArray[np.float64]:
        """A copy of the most recent rows, oldest first (reader side)."""
        cycles = self.cycles
        available = min(cycles, self.capacity)
        count = available if count is None else min(count, available)
        end = cycles % self.capacity
        idx = (np.arange(end - count, end)) % self.capacity
        return self.rows[idx].copy()

    def summary(self, count: int | None = None) -> dict[str, Any]:
        rows = self.recent(count)
        result: dict[str, Any] = {"cycles": self.cycles, "deadline_misses": self.deadline_misses,
                                  "frames_missed": self.frames_missed, "frames_dropped": self.frames_dropped}
        if len(rows) < 2:
            return result
        starts = rows[:, INDEX["start"]]
        result["rate_hz"] = round((len(rows) - 1) / (starts[-1] - starts[0]), 2) if starts[-1] > starts[0] else 0.0
        for name in ("period_error_ms", "frame_age_ms", "invoke_ms", "overhead_ms", "preprocess_ms", "actuate_ms"):
            column = rows[1:, INDEX[name]] if name == "period_error_ms" else rows[:, INDEX[name]]
            result[name] = {
                "p50": round(float(np.percentile(column, 50)), 3),
                "p99": round(float(np.percentile(column, 99)), 3),
                "max": round(float(column.max()), 3),
            }
        return result
