"""Benchmark: the twin's cost per frame, and how many cars one twin serves at 20 Hz.

Part 1 pins this process to one core and times, per frame, the physics step, the camera
render, JPEG encoding and the whole telemetry message (what the server does per car per
tick). Target: render + physics <= 2 ms at 160x120 on one core.

Part 2 starts a real twin server and connects N raw-socket cars at once (N = 1, 4, 8, 16),
each reading telemetry for a few seconds, and reports the rate each car received.

Writes bench/results/twin.json and bench/results/twin.png. Run: ./dev.sh bench
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from simulator.render import CameraConfig, Randomization
from simulator.server import ServerConfig, TwinServer
from simulator.world import TwinCar

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summarise(values_ms: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values_ms), 4),
        "p50": round(percentile(values_ms, 50), 4),
        "p99": round(percentile(values_ms, 99), 4),
        "max": round(max(values_ms), 4),
    }


def time_frames(track: str, camera: CameraConfig, randomization: Randomization, frames: int) -> dict[str, object]:
    car = TwinCar(track, seed=1, camera=camera, randomization=randomization)
    car.set_controls(0.1, 0.3)
    physics, render, encode, message = [], [], [], []
    for i in range(frames + 50):
        car.set_controls(0.3 * np.sin(i / 20), 0.3)
        t0 = time.perf_counter()
        car.advance(0.05)
        t1 = time.perf_counter()
        frame = car.render()
        t2 = time.perf_counter()
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG")
        t3 = time.perf_counter()
        telemetry = car.telemetry()
        telemetry["image"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        json.dumps(telemetry, separators=(",", ":"))
        t4 = time.perf_counter()
        if i >= 50:  # warm-up excluded
            physics.append((t1 - t0) * 1e3)
            render.append((t2 - t1) * 1e3)
            encode.append((t3 - t2) * 1e3)
            message.append((t4 - t0) * 1e3)
    both = [p + r for p, r in zip(physics, render, strict=True)]
    return {
        "track": track,
        "size": f"{camera.width}x{camera.height}",
        "randomized": randomization.enabled,
        "physics_ms": summarise(physics),
        "render_ms": summarise(render),
        "render_plus_physics_ms": summarise(both),
        "jpeg_ms": summarise(encode),
        "telemetry_message_ms": summarise(message),
        "samples": {"render_plus_physics_ms": both},
    }


def serve_in_thread(config: ServerConfig) -> tuple[TwinServer, asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    server = TwinServer(config)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            await server.start()
            started.set()
            await server.serve()

        loop.run_until_complete(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(30)
    return server, loop, thread


def car_rates(port: int, cars: int, seconds: float) -> list[float]:
    """Connect ``cars`` raw clients, count telemetry lines each receives over ``seconds``."""
    counts = [0] * cars
    ready = threading.Barrier(cars + 1)

    def client(index: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        buffer = b""
        while b"car_loaded" not in buffer:
            buffer += sock.recv(65536)
        ready.wait()
        end = time.monotonic() + seconds
        buffer = b""
        sock.settimeout(0.5)
        while time.monotonic() < end:
            try:
                data = sock.recv(256 * 1024)
            except TimeoutError:
                continue
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            counts[index] += sum(1 for line in lines if b'"telemetry"' in line)
        sock.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(cars)]
    for thread in threads:
        thread.start()
    ready.wait()
    for thread in threads:
        thread.join()
    return [count / seconds for count in counts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per multi-car run")
    parser.add_argument("--cars", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)

    cpu = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu[0]})  # part 1 on one core
    frame_runs = [
        time_frames("generated_track", CameraConfig(), Randomization(), args.frames),
        time_frames("mountain_track", CameraConfig(), Randomization(), args.frames),
        time_frames("generated_track", CameraConfig(), Randomization(lighting=0.3, texture=1.0, noise=6.0),
                    args.frames),
        time_frames("generated_track", CameraConfig(width=320, height=240), Randomization(), args.frames // 4),
    ]
    os.sched_setaffinity(0, set(cpu))
    for run in frame_runs:
        print(f"{run['track']:16s} {run['size']:8s} randomized={run['randomized']!s:5s} "
              f"render+physics p50 {run['render_plus_physics_ms']['p50']:.3f} ms "
              f"p99 {run['render_plus_physics_ms']['p99']:.3f} ms | jpeg p50 {run['jpeg_ms']['p50']:.3f} ms | "
              f"whole telemetry p50 {run['telemetry_message_ms']['p50']:.3f} ms")

    server, loop, thread = serve_in_thread(ServerConfig(port=0, track="generated_track"))
    multi = []
    for cars in args.cars:
        rates = car_rates(server.config.port, cars, args.seconds)
        multi.append({"cars": cars, "min_hz": round(min(rates), 2), "mean_hz": round(statistics.fmean(rates), 2)})
        print(f"{cars:3d} cars: min {min(rates):5.2f} Hz, mean {statistics.fmean(rates):5.2f} Hz per car")
    loop.call_soon_threadsafe(server.request_stop, "benchmark done")
    thread.join(10)

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        machine["cpu"] = model
    except (OSError, StopIteration):
        pass
    result = {"machine": machine, "frames": [{k: v for k, v in r.items() if k != "samples"} for r in frame_runs],
              "multi_car": multi}
    (RESULTS / "twin.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(frame_runs, multi, RESULTS / "twin.png")
    print(f"wrote {RESULTS / 'twin.json'} and {RESULTS / 'twin.png'}")


def plot(frame_runs: list[dict], multi: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in frame_runs:
        samples = np.sort(np.asarray(run["samples"]["render_plus_physics_ms"]))
        label = f"{run['track']} {run['size']}{' randomized' if run['randomized'] else ''}"
        left.plot(samples, np.linspace(0, 1, len(samples)), label=label)
    left.axvline(2.0, color="red", linestyle="--", label="target 2 ms")
    left.set_xlabel("render + physics per frame (ms, one core)")
    left.set_ylabel("cumulative fraction")
    left.legend(fontsize=7)
    left.set_title("Twin frame cost")
    cars = [m["cars"] for m in multi]
    right.plot(cars, [m["min_hz"] for m in multi], "o-", label="slowest car")
    right.plot(cars, [m["mean_hz"] for m in multi], "s--", label="mean")
    right.axhline(20.0, color="red", linestyle="--", label="20 Hz")
    right.set_xlabel("cars connected at once")
    right.set_ylabel("telemetry received per car (Hz)")
    right.set_ylim(0, 25)
    right.legend()
    right.set_title("One twin, many cars")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
