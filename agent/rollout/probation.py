"""Probation: a newly promoted model is watched for a while, and rolled back if it misbehaves.

Pure: the drive core's events and the time go in, a verdict comes out, so every path is tested with a fake
clock (tests/test_rollout.py). What counts against a model is what a model can cause: inference errors (an
exception or a non-finite output), overrun streaks, and a stalled drive thread (an invoke that hangs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.core.handoff import Event

MODEL_FAULTS = {"inference_error": "inference errors", "inference_overrun": "inference overruns",
                "drive_stall": "drive stalls"}


@dataclass(frozen=True, slots=True)
class ProbationLimits:
    window_s: float = 120.0  # how long a promoted model is on probation
    max_inference_errors: int = 0  # more than this many fault episodes of each kind roll the model back
    max_inference_overruns: int = 0
    max_drive_stalls: int = 0


@dataclass
class Probation:
    label: dict[str, Any]
    started: float
    limits: ProbationLimits = field(default_factory=ProbationLimits)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODEL_FAULTS, 0))

    def observe(self, event: Event) -> None:
        fault = event.detail.get("fault") if event.kind == "fault" else None
        if fault in self.counts and event.monotonic >= self.started:
            self.counts[fault] += 1

    def verdict(self, now: float) -> tuple[str, str]:
        """("watching" | "passed" | "rollback", why)."""
        limits = {"inference_error": self.limits.max_inference_errors,
                  "inference_overrun": self.limits.max_inference_overruns,
                  "drive_stall": self.limits.max_drive_stalls}
        over = [f"{self.counts[k]} {MODEL_FAULTS[k]} (at most {limit})" for k, limit in limits.items()
                if self.counts[k] > limit]
        if over:
            return "rollback", "; ".join(over) + f" within {now - self.started:.0f} s of promotion"
        if now - self.started >= self.limits.window_s:
            return "passed", f"{self.limits.window_s:g} s without a model fault"
        return "watching", f"{now - self.started:.0f} of {self.limits.window_s:g} s"
