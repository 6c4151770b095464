"""Benchmark: our drive core against DonkeyCar's own Vehicle loop, same parts, same run.

Parts shared by both loops (thin adapters on DonkeyCar's side): the twin camera and twin
actuators over the Donkey simulator protocol, the shipped model (models/pilot.tflite; on
DonkeyCar's side run by its own KerasLinear + TfLite interpreter), and our tub recorder.
Loads: none; in-process telemetry-like work (two busy Python threads) plus recording; external
CPU stress on every core. Each loop runs in its own process, so RSS and start-up are its own.
The twin runs as a separate process with real-time priority when allowed, standing in for a
camera that does not slow down under load.

    python bench/drive_loop.py [--seconds 20]       # writes bench/results/drive_loop.{json,png}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = ROOT / "models" / "pilot.tflite"
RATE_HZ = 20.0
LOADS = ("none", "in-process", "cpu-stress")  # "mqtt-flood" is run by bench/mqtt_publish.py


# -- loads ---------------------------------------------------------------------------------------
def telemetry_like_work(stop: threading.Event) -> None:
    """What an agent's other threads do: build and encode status documents, in pure Python."""
    counter = 0
    while not stop.is_set():
        document = {"seq": counter, "values": {f"k{i}": i * 0.5 for i in range(50)}, "faults": ["a", "b"]}
        json.dumps(document)
        counter += 1


def spin() -> None:
    while True:
        pass


def mqtt_flood(stop: threading.Event, port: int, counter: list[int]) -> None:
    """Publish telemetry-sized messages at DONKEY_BENCH_RATE per second (default 2,000) from this process,
    as the fleet link would, in bursts every 10 ms."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    rate = float(os.environ.get("DONKEY_BENCH_RATE", "2000"))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_publish = lambda *args: counter.__setitem__(0, counter[0] + 1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = json.dumps({"version": 1, "seq": 0, "ts": 0, "values": {f"k{i}": i * 0.5 for i in range(20)}})
    burst, tick = max(1, round(rate / 100)), 0.01
    deadline = time.monotonic()
    while not stop.is_set():
        for _ in range(burst):
            client.publish("bench/flood", payload, qos=0)
        deadline += tick
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    client.loop_stop()
    client.disconnect()


class Load:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.processes: list[multiprocessing.Process] = []

    def __enter__(self) -> Load:
        if self.kind == "in-process":
            self.threads = [threading.Thread(target=telemetry_like_work, args=(self.stop,), daemon=True)
                            for _ in range(2)]
            for thread in self.threads:
                thread.start()
        elif self.kind == "mqtt-flood":
            self.published = [0]
            port = int(os.environ["DONKEY_BENCH_BROKER_PORT"])
            self.threads = [threading.Thread(target=mqtt_flood, args=(self.stop, port, self.published), daemon=True)]
            self.threads[0].start()
        elif self.kind == "cpu-stress":
            self.processes = [multiprocessing.Process(target=spin, daemon=True) for _ in range(os.cpu_count() or 2)]
            for process in self.processes:
                process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(2)
        for process in self.processes:
            process.terminate()
            process.join(2)


# -- measurements common to both loops ---------------------------------------------------------
def summarise(actuations: list[float], frame_ages: list[float], seqs: list[int], invokes: list[float],
              overheads: list[float], startup: float) -> dict[str, Any]:
    times = np.asarray(actuations)
    errors = np.abs(np.diff(times) - 1.0 / RATE_HZ) * 1e3
    decided = [s for s in seqs if s >= 0]
    reused = len(decided) - len(set(decided))

    def stats(values: Any) -> dict[str, float]:
        values = np.asarray(values, dtype=float)
        return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3),
                "max": round(float(values.max()), 3)}

    return {
        "cycles": len(times),
        "period_error_ms": stats(errors),
        "frame_age_ms": stats(np.asarray(frame_ages) * 1e3),
        "frames_reused": reused,
        "invoke_ms": stats(np.asarray(invokes) * 1e3),
        "overhead_ms": stats(np.asarray(overheads) * 1e3),
        "startup_s": round(startup, 3),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "period_error_samples_ms": [round(float(e), 3) for e in errors[:: max(1, len(errors) // 400)]],
    }


def parts(port: int) -> tuple[Any, Any, Any]:
    from agent.hw.twin import TwinActuators, TwinCamera, TwinLink

    link = TwinLink("127.0.0.1", port, scene="generated_track")
    return link, TwinCamera(link), TwinActuators(link)


def recorder_for(load: str, directory: Path) -> Any:
    if load != "in-process":
        return None
    from agent.core.drive import RECORD_INPUTS, RECORD_TYPES
    from agent.tub import TubRecorder, TubWriter

    return TubRecorder(TubWriter(directory, RECORD_INPUTS, RECORD_TYPES))


# -- our drive core --------------------------------------------------------------------------------
def run_ours(port: int, seconds: float, load: str, pacing: str) -> dict[str, Any]:
    from agent.config import DriveConfig, RealtimeConfig
    from agent.core.drive import DriveCore, DriveParts
    from agent.core.metrics import INDEX
    from agent.pilot import Autopilot

    started = time.monotonic()
    link, camera, actuators = parts(port)
    recorder = recorder_for(load, Path(tempfile.mkdtemp()) / "tub")
    config = DriveConfig(rate_hz=RATE_HZ, pacing=pacing, max_throttle=0.5,  # type: ignore[arg-type]
                         realtime=RealtimeConfig(priority=50, lock_memory=True))
    core = DriveCore(config, DriveParts(camera, actuators, lambda: Autopilot(MODEL), recorder))
    with Load(load) as running_load:
        core.start()
        if not core.wait_ready(60):
            raise SystemExit(f"our core did not start: {core.error}")
        time.sleep(seconds)
        first_actuation = float(core.metrics.rows[0, INDEX["actuated"]])  # row 0: the first cycle
        core.stop()
    published = getattr(running_load, "published", None)
    rows = core.metrics.recent()[5:]  # the first cycles include warm-up effects for both loops
    ends = rows[:, INDEX["actuated"]]  # when each write began
    seqs = [int(s) if d else -1 for s, d in zip(rows[:, INDEX["frame_seq"]], rows[:, INDEX["decided"]], strict=True)]
    result = summarise(list(ends), list(rows[:, INDEX["frame_age_ms"]] / 1e3), seqs,
                       list(rows[rows[:, INDEX["decided"]] == 1, INDEX["invoke_ms"]] / 1e3),
                       list(rows[:, INDEX["overhead_ms"]] / 1e3), first_actuation - started)
    result["realtime"] = core.realtime.as_dict() if core.realtime else None
    if published is not None:
        result["published_per_s"] = round(published[0] / seconds, 1)  # sent on the socket (on_publish)
    result["frames_missed"] = core.metrics.frames_missed
    if recorder is not None:
        recorder.close()
        result["recorded"] = recorder.written
    link.close()
    return result


# -- DonkeyCar's Vehicle loop ------------------------------------------------------------------------
def run_donkeycar(port: int, seconds: float, load: str) -> dict[str, Any]:
    import logging

    logging.disable(logging.INFO)
    from donkeycar.parts.interpreter import TfLite
    from donkeycar.parts.keras import KerasLinear
    from donkeycar.vehicle import Vehicle

    started = time.monotonic()
    link, camera, actuators = parts(port)
    recorder = recorder_for(load, Path(tempfile.mkdtemp()) / "tub")
    record: dict[str, list] = {"start": [], "end": [], "age": [], "seq": [], "invoke": []}

    class CameraPart:  # threaded, as DonkeyCar's cameras are: the loop takes whatever is newest
        def __init__(self) -> None:
            self.frame = None
            self.running = True

        def update(self) -> None:
            seq = -1
            while self.running:
                frame = camera.read(seq, 0.5)
                if frame is not None:
                    self.frame, seq = frame, frame.seq

        def run_threaded(self) -> tuple[Any, int, float]:
            frame = self.frame
            return (frame.image, frame.seq, frame.timestamp) if frame else (None, -1, 0.0)

        def shutdown(self) -> None:
            self.running = False

    class LoopStart:
        def run(self) -> None:
            record["start"].append(time.monotonic())

    pilot = KerasLinear(interpreter=TfLite())
    pilot.load(str(MODEL))

    class TimedPilot:  # DonkeyCar's own pilot; only timed
        def run(self, image: Any) -> tuple[float, float]:
            if image is None:
                return 0.0, 0.0
            t0 = time.monotonic()
            angle, throttle = pilot.run(image)
            record["invoke"].append(time.monotonic() - t0)
            return float(angle), float(throttle)

    class Actuate:
        def run(self, angle: float, throttle: float, seq: int, stamp: float) -> None:
            now = time.monotonic()  # when the write begins, as for our core
            actuators.write(angle, min(0.5, throttle))
            record["end"].append(now)
            record["age"].append(now - stamp)
            record["seq"].append(seq)

    class Record:
        def run(self, image: Any, angle: float, throttle: float) -> None:
            if recorder is not None and image is not None:
                recorder.submit({"cam/image_array": image, "user/angle": 0.0, "user/throttle": 0.0,
                                 "user/mode": "local", "pilot/angle": angle, "pilot/throttle": throttle})

    vehicle = Vehicle()
    vehicle.add(LoopStart())
    vehicle.add(CameraPart(), outputs=["cam/image_array", "cam/seq", "cam/stamp"], threaded=True)
    vehicle.add(TimedPilot(), inputs=["cam/image_array"], outputs=["pilot/angle", "pilot/throttle"])
    vehicle.add(Actuate(), inputs=["pilot/angle", "pilot/throttle", "cam/seq", "cam/stamp"])
    vehicle.add(Record(), inputs=["cam/image_array", "pilot/angle", "pilot/throttle"])
    while camera.read(-1, 5.0) is None:
        pass
    with Load(load):
        vehicle.start(rate_hz=RATE_HZ, max_loop_count=int((seconds + 0.5) * RATE_HZ) + 5)
    skip = 5
    overheads = [end - start - inv for start, end, inv in
                 zip(record["start"][skip:], record["end"][skip:], record["invoke"][skip:], strict=False)]
    result = summarise(record["end"][skip:], record["age"][skip:], record["seq"][skip:], record["invoke"][skip:],
                       overheads, record["end"][0] - started)
    if recorder is not None:
        recorder.close()
        result["recorded"] = recorder.written
    link.close()
    return result


# -- orchestration --------------------------------------------------------------------------------
def start_twin() -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, "-m", "simulator", "serve", "--port", "0", "--track", "generated_track"]
    if os.geteuid() == 0 and shutil.which("chrt"):
        command = ["chrt", "-f", "40", *command]
    twin = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert twin.stderr is not None
    while True:
        line = twin.stderr.readline()
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if match:
            threading.Thread(target=twin.stderr.read, daemon=True).start()  # keep draining its log
            return twin, int(match.group(1))
        if not line:
            raise SystemExit("the twin did not start")


def run_child(loop: str, load: str, seconds: float, port: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", loop, "--load", load, "--seconds", str(seconds),
                          "--port", str(port)], capture_output=True, text=True, cwd=ROOT, timeout=seconds * 4 + 120,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"{loop}/{load} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "numpy": np.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--child", choices=["ours", "ours-camera", "donkeycar"])
    parser.add_argument("--load", choices=[*LOADS, "mqtt-flood"], default="none")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.child:
        if args.child == "donkeycar":
            result = run_donkeycar(args.port, args.seconds, args.load)
        else:
            result = run_ours(args.port, args.seconds, args.load, "camera" if args.child == "ours-camera" else "timer")
        print(json.dumps(result))
        os._exit(0)  # DonkeyCar leaves non-daemon threads behind

    RESULTS.mkdir(parents=True, exist_ok=True)
    twin, port = start_twin()
    runs = []
    try:
        for load in LOADS:
            for loop in ("ours", "donkeycar", "ours-camera"):
                result = run_child(loop, load, args.seconds, port)
                runs.append({"loop": loop, "load": load, **result})
                print(f"{loop:12s} {load:11s} period error p50 {result['period_error_ms']['p50']:7.3f} "
                      f"p99 {result['period_error_ms']['p99']:7.3f} max {result['period_error_ms']['max']:7.3f} ms | "
                      f"frame age p50 {result['frame_age_ms']['p50']:6.1f} ms | reused {result['frames_reused']:3d} | "
                      f"invoke p50 {result['invoke_ms']['p50']:5.2f} ms | overhead p99 "
                      f"{result['overhead_ms']['p99']:5.2f} ms | start {result['startup_s']:5.2f} s | "
                      f"RSS {result['rss_mb']:6.1f} MB", flush=True)
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(10)
    ratios = {}
    for load in LOADS:
        ours = next(r for r in runs if r["loop"] == "ours" and r["load"] == load)
        theirs = next(r for r in runs if r["loop"] == "donkeycar" and r["load"] == load)
        ratios[load] = round(theirs["period_error_ms"]["p99"] / max(ours["period_error_ms"]["p99"], 1e-3), 1)
        print(f"p99 period error, DonkeyCar / ours, load {load}: {ratios[load]}x")
    (RESULTS / "drive_loop.json").write_text(json.dumps({"machine": machine(), "rate_hz": RATE_HZ,
                                                         "seconds": args.seconds, "runs": runs,
                                                         "p99_ratio": ratios}, indent=1) + "\n")
    plot(runs, RESULTS / "drive_loop.png")
    print(f"wrote {RESULTS / 'drive_loop.json'} and {RESULTS / 'drive_loop.png'}")


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LOADS), figsize=(13, 4), sharey=True)
    colours = {"ours": "tab:blue", "ours-camera": "tab:cyan", "donkeycar": "tab:red"}
    labels = {"ours": "donkey-agent (timer)", "ours-camera": "donkey-agent (camera-paced)",
              "donkeycar": "DonkeyCar Vehicle loop"}
    for axis, load in zip(axes, LOADS, strict=True):
        for run in (r for r in runs if r["load"] == load):
            samples = np.sort(np.maximum(np.asarray(run["period_error_samples_ms"]), 1e-3))
            axis.plot(samples, 1 - np.linspace(0, 1, len(samples), endpoint=False), label=labels[run["loop"]],
                      color=colours[run["loop"]])
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(f"load: {load}")
        axis.set_xlabel("period error (ms, log)")
    axes[0].set_ylabel("fraction of cycles above (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Period error at {RATE_HZ:.0f} Hz: complementary CDF (lower and further left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
