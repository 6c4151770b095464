"""Benchmark: our drive loop against DonkeyCar's own Vehicle loop, timed from inside and from outside, in one run.

Same parts for every loop: the twin's camera and actuators over the Donkey simulator protocol (our client), the
shipped model (on DonkeyCar's side run by its own KerasLinear + TfLite part), our tub recorder. Loops: our drive
core in each pacing (``locked``, the default; ``camera``; ``timer``) and DonkeyCar 5.3's ``Vehicle``. Loads:
none; cpu-stress (one spinning process per core); in-process (two busy Python threads plus recording, the worst
case for the GIL); realistic (ours: the whole ``donkey-agent run`` with recording, its fleet link to a local
mosquitto receiving 20 commands/s and its Prometheus endpoint scraped at 10 Hz; DonkeyCar: recording).

Every run goes through ``bench/stopwatch.py``, a relay in its own process that takes the kernel's receive
timestamps of every frame and control: the external period error, frame-to-control latency and controls without
a new frame sit beside each loop's own figures. Each loop runs in its own process (RSS and start-up are its own);
the twin runs in another, at SCHED_FIFO 40 when allowed, standing in for a camera that does not slow down.

    python bench/drive_loop.py [--seconds 20] [--loads none,cpu-stress]   # bench/results/drive_loop.{json,png}
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
LOADS = ("none", "cpu-stress", "in-process", "realistic", "jitter")  # "mqtt-flood" is run by bench/mqtt_publish.py
ROLLOUT_LOADS = ("shadow", "swaps")  # ours only: a shadow trial beside the loop; a model swapped in each second
LOOPS = ("ours", "ours-camera", "ours-timer", "donkeycar")
PACING = {"ours": "locked", "ours-camera": "camera", "ours-timer": "timer"}
JITTER_MS = 5.0  # the "jitter" load: the relay delays each frame by 0-10 ms (a camera +-5 ms around its mean)
SKIP_CONTROLS = 60  # warm-up, the phase lock's acquisition and the offset's first setting (~2 s) left out


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
        if not len(values):  # e.g. no inference at all (user mode, the swap benchmark)
            return {}
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
    if load not in ("in-process", "realistic"):
        return None
    from agent.core.drive import RECORD_INPUTS, RECORD_TYPES
    from agent.tub import TubRecorder, TubWriter

    return TubRecorder(TubWriter(directory, RECORD_INPUTS, RECORD_TYPES))


# -- our drive core --------------------------------------------------------------------------------
def output_delay_ms() -> float:
    """Camera and timer pacing's fixed delay: the default 10 ms, or half a period at rates above 50 Hz."""
    return min(10.0, 500.0 / RATE_HZ)


def run_ours(port: int, seconds: float, load: str, pacing: str) -> dict[str, Any]:
    from agent.config import DriveConfig, RealtimeConfig
    from agent.core.drive import DriveCore, DriveParts
    from agent.core.metrics import INDEX
    from agent.pilot import Autopilot

    started = time.monotonic()
    link, camera, actuators = parts(port)
    recorder = recorder_for(load, Path(tempfile.mkdtemp()) / "tub")
    config = DriveConfig(rate_hz=RATE_HZ, pacing=pacing, max_throttle=0.5,  # type: ignore[arg-type]
                         output_delay_ms=output_delay_ms(),
                         realtime=RealtimeConfig(priority=50, lock_memory=True))
    if load == "swaps":  # stopped (user mode, no operator: neutral), so every swap is applied
        config = config.model_copy(update={"mode": "user", "stopped_after_ms": 0.0})
    core = DriveCore(config, DriveParts(camera, actuators, lambda: Autopilot(MODEL), recorder))
    rollout_work: dict[str, Any] = {}
    with Load(load) as running_load:
        core.start()
        if not core.wait_ready(60):
            raise SystemExit(f"our core did not start: {core.error}")
        worker = start_rollout_work(load, core, rollout_work)
        time.sleep(seconds)
        rollout_work["stop"] = True
        if worker is not None:
            worker.join(10)
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
    result["rollout_work"] = {k: v for k, v in rollout_work.items() if k != "stop"}
    result["pacing"] = core.pacer.status()
    if recorder is not None:
        recorder.close()
        result["recorded"] = recorder.written
    link.close()
    return result


def start_rollout_work(load: str, core: Any, record: dict[str, Any]) -> threading.Thread | None:
    """The model rollout's work beside the loop (issue 11's benchmark): ``shadow``, a shadow trial of the same model
    on its own thread and interpreter; ``swaps``, a new interpreter loaded, warmed and swapped in every second
    (the car stopped: user mode, an operator holding neutral, so no fault and the outputs keep their slots)."""
    from agent.core.commands import SwapPilot
    from agent.core.shadow import ShadowTap
    from agent.pilot import Autopilot
    from agent.rollout.shadow import ShadowCriteria, ShadowTrial

    if load == "shadow":
        tap = ShadowTap()
        candidate = Autopilot(MODEL, num_threads=1)  # as the rollout loads it: on the shadow thread, at nice 10
        trial = ShadowTrial(tap, candidate, ShadowCriteria(min_frames=1), {"name": "candidate"})
        trial.start()
        core.shadow = tap

        def watch() -> None:
            while not record.get("stop"):
                time.sleep(0.2)
            core.shadow = None
            trial.stop()
            record.update(trial.summary())

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread
    if load == "swaps":
        def operator() -> None:  # an operator holding the car at neutral: user mode without a heartbeat fault
            while not record.get("stop"):
                core.manual.set(0.0, 0.0)
                time.sleep(0.05)

        threading.Thread(target=operator, daemon=True).start()

        def swap() -> None:
            applied = refused = 0
            while not record.get("stop"):
                pilot = Autopilot(MODEL)
                pilot.run(np.full((120, 160, 3), 128, np.uint8))
                command = SwapPilot(pilot=pilot, label={"name": "candidate", "version": str(applied)})
                core.submit(command)
                deadline = time.monotonic() + 2
                while command.outcome is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                applied, refused = (applied + 1, refused) if command.outcome and command.outcome.ok else (
                    applied, refused + 1)
                command.replaced = None  # released here, off the drive thread
                time.sleep(1.0)
            record.update(swaps_applied=applied, swaps_refused=refused)

        thread = threading.Thread(target=swap, daemon=True)
        thread.start()
        return thread
    return None


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
    command = [sys.executable, "-m", "simulator", "serve", "--port", "0", "--track", "generated_track", "--fps",
               str(RATE_HZ)]
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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stopwatch:
    """bench/stopwatch.py in its own process, relaying to the twin: the external timing of one run."""

    def __init__(self, twin_port: int, jitter_ms: float = 0.0) -> None:
        self.port = free_port()
        self.out = Path(tempfile.mkdtemp()) / "times.json"
        command = [sys.executable, str(ROOT / "bench" / "stopwatch.py"), "--listen", str(self.port), "--upstream",
                   f"127.0.0.1:{twin_port}", "--out", str(self.out), "--jitter-ms", str(jitter_ms)]
        if os.geteuid() == 0 and shutil.which("chrt"):
            # The instrument must not be the jitter it measures: at a normal priority, a loaded machine delays
            # its forwarding of frames by milliseconds (its timestamps stay the kernel's, the loop's input not).
            command = ["chrt", "-f", "45", *command]
        self.process = subprocess.Popen(command, cwd=ROOT)
        deadline = time.monotonic() + 10
        while not _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def result(self) -> dict[str, Any]:
        sys.path.insert(0, str(ROOT / "bench"))
        from stopwatch import analyse

        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)
        connections = json.loads(self.out.read_text())
        busiest = max(connections, key=lambda c: len(c["controls"]))  # the loop's car (not a probe)
        # leave out the warm-up at the start and the stop at the end (a neutral and a brake, back to back)
        skip = int(SKIP_CONTROLS * RATE_HZ / 20.0)  # the same ~3 s at any rate
        return analyse(busiest["frames"], busiest["controls"][:-3], 1.0 / RATE_HZ, skip=skip)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def run_child(loop: str, load: str, seconds: float, port: int) -> dict[str, Any]:
    """One loop under one load, through a stopwatch: its own figures and the stopwatch's."""
    stopwatch = Stopwatch(port, JITTER_MS if load == "jitter" else 0.0)
    try:
        if loop != "donkeycar" and load == "realistic":
            result = run_agent(stopwatch.port, seconds, PACING[loop])
        else:
            out = subprocess.run([sys.executable, __file__, "--child", loop, "--load", load, "--seconds",
                                  str(seconds), "--port", str(stopwatch.port), "--rate", str(RATE_HZ)],
                                 capture_output=True, text=True,
                                 cwd=ROOT, timeout=seconds * 4 + 120, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{loop}/{load} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        external = stopwatch.result()
    return {**result, "external": external}


def run_agent(port: int, seconds: float, pacing: str) -> dict[str, Any]:
    """The realistic load: the whole agent, with recording, its fleet link under 20 commands/s, and scrapes."""
    import urllib.request

    sys.path.insert(0, str(ROOT))
    from tests.mosquitto import Broker

    work = Path(tempfile.mkdtemp())
    broker = Broker(work).start()
    metrics = free_port()
    config = work / "agent.toml"
    config.write_text(f"""[drive]\npacing = "{pacing}"\nrate_hz = {RATE_HZ}\noutput_delay_ms = {output_delay_ms()}
[drive.realtime]\npriority = 50
[state]\ndirectory = "{work / 'state'}"
[telemetry]\nurl = "mqtt://127.0.0.1:{broker.port}"\ncar_id = "bench"\nprometheus = "127.0.0.1:{metrics}"
command_rate_per_s = 50.0\n""")
    started = time.monotonic()
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim",
                              f"127.0.0.1:{port}", "--model", str(MODEL), "--record", str(work / "tub"),
                              "--duration", str(seconds + 8)], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stop = threading.Event()

    def commands() -> None:  # 20 valid commands a second from the fleet
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        number = 0
        while not stop.wait(0.05):
            number += 1
            client.publish("donkey/default/bench/cmd/set_max_throttle",
                           json.dumps({"id": f"b{number}", "value": 0.5}), qos=1)
        client.loop_stop()

    def scrapes() -> None:  # Prometheus at 10 Hz
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2).read()

    workers = [threading.Thread(target=commands, daemon=True), threading.Thread(target=scrapes, daemon=True)]
    for worker in workers:
        worker.start()
    try:
        _, log = agent.communicate(timeout=seconds + 120)
    finally:
        stop.set()
        for worker in workers:
            worker.join(5)
        broker.stop()
    summary = re.search(r"stopped \([^)]*\): (\d+) cycles, (\d+) deadline misses.*period error p99 (\S+) ms", log)
    ready = re.search(r"ready: ", log)
    return {"cycles": int(summary.group(1)) if summary else None,
            "period_error_ms": {"p99": float(summary.group(3))} if summary else {},
            "startup_s": round(time.monotonic() - started, 1) if ready else None, "whole_agent": True}


def machine() -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "numpy": np.__version__}


def describe(loop: str, load: str, result: dict[str, Any]) -> str:
    ext = result.get("external", {})
    inside = result.get("period_error_ms", {})

    def fig(stats: dict[str, float], key: str) -> str:
        return f"{stats[key]:7.3f}" if key in stats else "      –"

    return (f"{loop:12s} {load:11s} | external period error p50 {fig(ext.get('period_error_ms', {}), 'p50')} "
            f"p99 {fig(ext.get('period_error_ms', {}), 'p99')} max {fig(ext.get('period_error_ms', {}), 'max')} | "
            f"latency p50 {fig(ext.get('latency_ms', {}), 'p50')} p99 {fig(ext.get('latency_ms', {}), 'p99')} | "
            f"no new frame {ext.get('controls_without_new_frame', '–')} | internal p99 {fig(inside, 'p99')}"
            + (" | held {held_outputs} late frames {late_frames} late outputs {late_outputs} offset "
               "{output_offset_ms} ms".format(**result["pacing"])
               if "held_outputs" in result.get("pacing", {}) else "")
        + (f" | {result['rollout_work']}" if result.get("rollout_work") else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--loads", default=",".join(LOADS), help="comma-separated, of " + ", ".join(LOADS))
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated, of " + ", ".join(LOOPS))
    parser.add_argument("--child", choices=list(LOOPS))
    parser.add_argument("--load", choices=[*LOADS, *ROLLOUT_LOADS, "mqtt-flood"], default="none")
    parser.add_argument("--port", type=int)
    parser.add_argument("--rate", type=float, default=20.0, help="camera and control rate, Hz (default 20)")
    parser.add_argument("--name", help="results file name under bench/results (default: drive_loop[_<rate>hz])")
    args = parser.parse_args()
    global RATE_HZ  # noqa: PLW0603 (one setting for the whole run, children included)
    RATE_HZ = args.rate
    name = args.name or ("drive_loop" if RATE_HZ == 20.0 else f"drive_loop_{RATE_HZ:g}hz")
    if args.child:
        if args.child == "donkeycar":
            result = run_donkeycar(args.port, args.seconds, args.load)
        else:
            result = run_ours(args.port, args.seconds, args.load, PACING[args.child])
        print(json.dumps(result))
        os._exit(0)  # DonkeyCar leaves non-daemon threads behind

    loads = [load for load in args.loads.split(",") if load]
    loops = [loop for loop in args.loops.split(",") if loop]
    RESULTS.mkdir(parents=True, exist_ok=True)
    twin, port = start_twin()
    runs = []
    try:
        for load in loads:
            for loop in loops:
                result = run_child(loop, load, args.seconds, port)
                runs.append({"loop": loop, "load": load, **result})
                print(describe(loop, load, result), flush=True)
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(10)
    ratios = {}
    for load in loads if {"ours", "donkeycar"} <= set(loops) else ():
        ours = next(r for r in runs if r["loop"] == "ours" and r["load"] == load)["external"]
        theirs = next(r for r in runs if r["loop"] == "donkeycar" and r["load"] == load)["external"]
        if "period_error_ms" in ours and "period_error_ms" in theirs:
            ratios[load] = {
                "period_p99": round(theirs["period_error_ms"]["p99"] / max(ours["period_error_ms"]["p99"], 1e-3), 1),
                "latency_p99": round(theirs["latency_ms"]["p99"] / max(ours["latency_ms"]["p99"], 1e-3), 1)}
            print(f"DonkeyCar / ours (locked), external, load {load}: period error p99 "
                  f"{ratios[load]['period_p99']}x, latency p99 {ratios[load]['latency_p99']}x")
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "rate_hz": RATE_HZ,
                                                         "seconds": args.seconds, "runs": runs,
                                                         "ratios": ratios}, indent=1) + "\n")
    plot(runs, loads, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


def plot(runs: list[dict[str, Any]], loads: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(loads), figsize=(3.6 * len(loads) + 1, 7), sharey="row", squeeze=False)
    colours = {"ours": "tab:blue", "ours-camera": "tab:cyan", "ours-timer": "tab:green", "donkeycar": "tab:red"}
    labels = {"ours": "donkey-agent, locked (default)", "ours-camera": "donkey-agent, camera-paced",
              "ours-timer": "donkey-agent, timer", "donkeycar": "DonkeyCar Vehicle loop"}
    for column, load in enumerate(loads):
        for run in (r for r in runs if r["load"] == load):
            external = run.get("external", {})
            for row, key in enumerate(("period_error_samples_ms", "latency_samples_ms")):
                if key not in external:
                    continue
                samples = np.sort(np.maximum(np.asarray(external[key]), 1e-3))
                axes[row][column].plot(samples, 1 - np.linspace(0, 1, len(samples), endpoint=False),
                                       label=labels[run["loop"]], color=colours[run["loop"]])
        for row, title in enumerate(("period error (ms, log)", "frame-to-control latency (ms, log)")):
            axis = axes[row][column]
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(title)
            if row == 0:
                axis.set_title(f"load: {load}")
    for row in range(2):
        axes[row][0].set_ylabel("fraction of controls above (log)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Timed from outside (kernel timestamps on the simulator link), {RATE_HZ:.0f} Hz: "
                 "complementary CDFs, lower and further left is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
