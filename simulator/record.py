"""Driving the twin with the expert and recording DonkeyCar Tub v2 training data.

``record_in_process`` steps the world directly (no sockets, no pacing) and runs as fast as
the machine allows; ``drive_over_protocol`` drives any Donkey simulator (our twin over TCP)
in real time through the same client the agent uses.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.hw.donkeysim.client import SimClient, SimError
from agent.tub import TubRecorder, TubWriter
from simulator.expert import ExpertConfig, ExpertPilot
from simulator.render import Randomization
from simulator.scenes import get_scene, scene_track
from simulator.world import TwinCar

RECORD_HZ = 20.0  # DonkeyCar's DRIVE_LOOP_HZ and CAMERA_FRAMERATE


@dataclass
class RecordResult:
    path: Path | None
    records: int
    laps: int
    stats: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    dropped: int = 0


Progress = Callable[[float, str], None]


def progress_printer(stream: Any = sys.stderr) -> Progress:
    """A progress line that rewrites itself on a terminal and prints every 10 % otherwise."""
    last = [-1]

    def report(fraction: float, text: str) -> None:
        if stream.isatty():
            stream.write(f"\r{text}\033[K")
            if fraction >= 1.0:
                stream.write("\n")
            stream.flush()
        else:
            step = int(fraction * 10)
            if step != last[0]:
                last[0] = step
                print(text, file=stream, flush=True)

    return report


def record_in_process(
    out: Path | None,
    *,
    track: str = "generated_track",
    laps: int = 3,
    noise: float = 0.0,
    recovery_interval: float = 0.0,
    speed: float | None = None,
    seed: int = 0,
    randomization: Randomization | None = None,
    metadata: dict[str, str] | None = None,
    progress: Progress | None = None,
    max_sim_seconds: float | None = None,
) -> RecordResult:
    """Drive ``laps`` laps with the expert at RECORD_HZ simulated time, writing a tub to ``out``.

    ``track`` is a scene name; a scene without geometry of its own records on the track that serves it.
    """
    car = TwinCar(scene_track(get_scene(track)), seed=seed, randomization=randomization)
    config = ExpertConfig(noise=noise, recovery_interval=recovery_interval)
    if speed is not None:
        config = ExpertConfig(speed=speed, noise=noise, recovery_interval=recovery_interval)
    expert = ExpertPilot(car.track, config, limits=car.limits, seed=seed)
    dt = 1.0 / RECORD_HZ
    limit = max_sim_seconds or laps * car.track.length / max(0.3, config.speed) * 3 + 30
    writer = (
        TubWriter(out, metadata={"source": "donkey-sim expert", "track": track, "seed": str(seed),
                                 "noise": str(noise), **(metadata or {})})
        if out is not None
        else None
    )
    started = time.perf_counter()
    records = 0
    try:
        while car.stats.laps < laps and car.time < limit:
            state = car.state
            command = expert.command(state.x, state.z, state.yaw, state.speed, dt)
            if writer is not None:
                writer.write({
                    "cam/image_array": car.render(),
                    "user/angle": command.steering,
                    "user/throttle": command.throttle,
                    "user/mode": "user",
                })
                records += 1
            car.set_controls(command.executed_steering, command.executed_throttle)
            car.advance(dt)
            if progress is not None and records % 20 == 0:
                done = min(1.0, (car.stats.laps + car.progress / car.track.length) / laps)
                progress(done, f"recording {track}: lap {min(car.stats.laps + 1, laps)}/{laps}, "
                               f"{records} records, {done:4.0%}")
    finally:
        if writer is not None:
            writer.close()
    if progress is not None:
        progress(1.0, f"recording {track}: {car.stats.laps} laps, {records} records, done")
    return RecordResult(out, records, car.stats.laps, car.stats.as_dict(), time.perf_counter() - started)


def completed_laps(client: SimClient) -> int:
    """Laps as gym-donkeycar counts them: the first start-line crossing starts the clock."""
    return client.laps


def drive_over_protocol(
    host: str,
    port: int,
    *,
    track: str = "generated_track",
    laps: int = 1,
    duration: float | None = None,
    out: Path | None = None,
    noise: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
    connect_timeout: float = 15.0,
) -> RecordResult:
    """Drive a car on a running simulator with the expert, in real time, optionally recording."""
    geometry = scene_track(get_scene(track))
    expert = ExpertPilot(geometry, ExpertConfig(noise=noise), seed=seed)
    recorder = TubRecorder(TubWriter(out, metadata={"source": "donkey-sim drive", "track": track})) if out else None
    started = time.monotonic()
    seq = 0
    last_time: float | None = None
    try:
        with SimClient(host, port, scene=track, car_name="expert", connect_timeout=connect_timeout) as client:
            while completed_laps(client) < laps and (duration is None or time.monotonic() - started < duration):
                telemetry = client.wait_next(seq, timeout=2.0)
                if telemetry is None:
                    raise SimError(client.disconnect_reason or "no telemetry from the simulator for 2 s")
                seq = telemetry.seq
                nodes = int(telemetry.number("totalNodes", geometry.node_count))
                if nodes != geometry.node_count:
                    raise SimError(f"the simulator is not running our {track!r} (it reports {nodes} path nodes)")
                sim_time = telemetry.number("time")
                dt = 1.0 / RECORD_HZ if last_time is None else max(1e-3, sim_time - last_time)
                last_time = sim_time
                yaw = math.radians(telemetry.number("yaw"))
                command = expert.command(telemetry.number("pos_x"), telemetry.number("pos_z"), yaw,
                                         telemetry.number("speed"), dt)
                client.send_control(command.executed_steering, command.executed_throttle)
                if recorder is not None and telemetry.image is not None:
                    recorder.submit({"cam/image_array": telemetry.image, "user/angle": command.steering,
                                     "user/throttle": command.throttle, "user/mode": "user"})
                if progress is not None and seq % 20 == 0:
                    done = completed_laps(client)
                    progress(min(1.0, done / laps),
                             f"driving {track}: lap {min(done + 1, laps)}/{laps}, cte "
                             f"{telemetry.number('cte'):+.2f} m, speed {telemetry.number('speed'):.2f} m/s")
            laps_done = completed_laps(client)
    finally:
        if recorder is not None:
            recorder.close()
    if progress is not None:
        progress(1.0, f"driving {track}: {laps_done} laps done")
    return RecordResult(
        out,
        recorder.written if recorder else 0,
        laps_done,
        elapsed_s=time.monotonic() - started,
        dropped=recorder.dropped if recorder else 0,
    )
