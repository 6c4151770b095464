"""Closed-loop evaluation of an autopilot on the twin, in-process and unpaced.

Frame -> model -> controls -> 50 ms of physics, exactly the order of the car's drive loop,
so a model's laps, lap times and cross-track error can be measured in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.pilot import Autopilot
from simulator.world import TwinCar

STEP = 0.05  # 20 Hz, DonkeyCar's DRIVE_LOOP_HZ


@dataclass
class Evaluation:
    track: str
    laps: int
    stats: dict[str, Any]
    consecutive_clean_laps: int  # the longest run of laps without an off-track event


def drive_model(
    model: Path | Autopilot,
    track: str = "generated_track",
    *,
    laps: int = 3,
    throttle_multiplier: float = 1.0,
    max_throttle: float = 1.0,
    seed: int = 0,
    max_seconds: float | None = None,
) -> Evaluation:
    pilot = model if isinstance(model, Autopilot) else Autopilot(model)
    car = TwinCar(track, seed=seed)
    limit = max_seconds if max_seconds is not None else laps * car.track.length / 0.5 + 30
    clean_run, best_run, events_at_lap_start = 0, 0, 0
    while car.stats.laps < laps and car.time < limit:
        output = pilot.run(car.render())
        throttle = max(-max_throttle, min(max_throttle, output.throttle * throttle_multiplier))
        car.set_controls(output.angle, throttle)
        if car.advance(STEP):
            clean = car.stats.off_track_events == events_at_lap_start
            clean_run = clean_run + 1 if clean else 0
            best_run = max(best_run, clean_run)
            events_at_lap_start = car.stats.off_track_events
    return Evaluation(track, car.stats.laps, car.stats.as_dict(), best_run)
