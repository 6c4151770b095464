"""Soak benchmark: the agent drives the twin for minutes with the fleet link and recording on.

What it measures, from outside the agent's process where it can:

- RSS of the agent process (``/proc/<pid>/status``, VmRSS) every few seconds: start (after warm-up),
  end, peak, and the growth per minute of a straight line through the samples;
- CPU of the drive thread (the kernel's utime + stime, scraped from the agent's Prometheus counter
  ``donkey_drive_thread_cpu_seconds_total``) as a share of one core, while driving and while faulted
  (an MQTT e-stop held for ``--faulted`` seconds in the middle of the run);
- the whole process's CPU (``/proc/<pid>/stat``) in the same windows;
- the drive loop's own summary (cycles, deadline misses) and the recorder's count.

    python bench/soak.py [--minutes 10] [--faulted 60]    # bench/results/soak.{json,png}
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = ROOT / "models" / "pilot.tflite"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)}


def publish(port: int, topic: str, body: dict[str, Any]) -> None:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-m",
                    json.dumps(body)], check=True, timeout=10)


def start_twin() -> tuple[subprocess.Popen[str], int]:
    twin = subprocess.Popen([sys.executable, "-m", "simulator", "serve", "--port", "0", "--track", "generated_track"],
                            stderr=subprocess.PIPE, text=True)
    assert twin.stderr is not None
    while True:
        line = twin.stderr.readline()
        found = re.search(r"listening on [\d.]+:(\d+)", line)
        if found:
            return twin, int(found.group(1))
        if not line:
            raise RuntimeError("the twin did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--faulted", type=float, default=60.0, help="seconds of e-stop in the middle")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        sys.exit("needs Debian's mosquitto and mosquitto-clients (./dev.sh test installs them)")

    work = Path(tempfile.mkdtemp(prefix="donkey-soak-"))
    broker_port, metrics_port = free_port(), free_port()
    (work / "mosquitto.conf").write_text(f"listener {broker_port} 127.0.0.1\nallow_anonymous true\n"
                                         "persistence false\n" + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen(["mosquitto", "-c", str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    twin, sim_port = start_twin()
    config = work / "agent.toml"
    config.write_text(f"""
[telemetry]
url = "mqtt://127.0.0.1:{broker_port}"
car_id = "soak"
fleet = "bench"
prometheus = "127.0.0.1:{metrics_port}"
[state]
directory = "{work / 'state'}"
""")
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim",
                              f"127.0.0.1:{sim_port}", "--model", str(MODEL), "--record", str(work / "tub")],
                             stderr=subprocess.PIPE, text=True)
    samples: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                scrape(metrics_port)
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(10.0)  # warm-up: caches, the outbox, the tub's first catalog
        total = args.minutes * 60
        fault_start = (total - args.faulted) / 2
        started = time.monotonic()
        phase = "driving"
        while (elapsed := time.monotonic() - started) < total:
            if phase == "driving" and elapsed >= fault_start and not any(s["phase"] == "faulted" for s in samples):
                publish(broker_port, "donkey/bench/soak/cmd/estop", {"id": "soak-estop"})
                phase = "faulted"
            elif phase == "faulted" and elapsed >= fault_start + args.faulted:
                publish(broker_port, "donkey/bench/soak/cmd/clear_fault", {"id": "soak-clear"})
                phase = "driving"
            metrics = scrape(metrics_port)
            samples.append({"t": round(elapsed, 2), "phase": phase, "rss_mb": round(rss_mb(agent.pid), 2),
                            "process_cpu_s": process_cpu_s(agent.pid),
                            "drive_cpu_s": metrics.get("donkey_drive_thread_cpu_seconds_total", 0.0),
                            "cycles": metrics.get("donkey_loop_cycles_total", 0.0),
                            "estop": metrics.get('donkey_fault_active{fault="estop"}', 0.0),
                            "recorded": metrics.get("donkey_recording_written", 0.0),
                            "record_lost": metrics.get("donkey_recording_lost", 0.0)})
            time.sleep(args.sample)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, log = agent.communicate(timeout=60)
        twin.send_signal(signal.SIGTERM)
        twin.wait(30)
        broker.terminate()
        broker.wait(10)
    result = analyse(samples, log, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps({"result": result, "samples": samples}, indent=1))
    plot(samples, RESULTS / "soak.png")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def share(samples: list[dict[str, Any]], phase: str, key: str) -> float:
    """CPU share of one core over the consecutive sample pairs that are both in ``phase``."""
    used = spent = 0.0
    for a, b in itertools.pairwise(samples):
        if a["phase"] == b["phase"] == phase and b["estop"] == (1.0 if phase == "faulted" else 0.0):
            used += b[key] - a[key]
            spent += b["t"] - a["t"]
    return round(100 * used / spent, 2) if spent else float("nan")


def analyse(samples: list[dict[str, Any]], log: str, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    rss = np.array([s["rss_mb"] for s in samples])
    t = np.array([s["t"] for s in samples])
    slope = float(np.polyfit(t / 60, rss, 1)[0]) if len(samples) > 2 else float("nan")
    summary = re.search(r"stopped \([^)]*\): (\d+) cycles, (\d+) deadline misses", log)
    recorded = re.search(r"recorded (\d+) records to \S+ \((\d+) lost", log)
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "minutes": args.minutes, "faulted_s": args.faulted,
        "rss_mb": {"start": float(rss[0]), "end": float(rss[-1]), "peak": float(rss.max()),
                   "slope_mb_per_min": round(slope, 3)},
        "drive_thread_cpu_pct": {"driving": share(samples, "driving", "drive_cpu_s"),
                                 "faulted": share(samples, "faulted", "drive_cpu_s")},
        "process_cpu_pct": {"driving": share(samples, "driving", "process_cpu_s"),
                            "faulted": share(samples, "faulted", "process_cpu_s")},
        "cycles": int(summary.group(1)) if summary else None,
        "deadline_misses": int(summary.group(2)) if summary else None,
        "recorded": int(recorded.group(1)) if recorded else None,
        "recording_lost": int(recorded.group(2)) if recorded else None,
    }


def plot(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(t, [s["rss_mb"] for s in samples], color="tab:blue")
    top.set_ylabel("agent RSS (MB)")
    rates = [0.0] + [100 * (b["drive_cpu_s"] - a["drive_cpu_s"]) / (b["t"] - a["t"])
                     for a, b in itertools.pairwise(samples)]
    bottom.plot(t, rates, color="tab:orange")
    bottom.set_ylabel("drive thread CPU (%)")
    bottom.set_xlabel("minutes")
    for s0, s1 in itertools.pairwise(samples):
        if s0["phase"] == "faulted":
            for axis in (top, bottom):
                axis.axvspan(s0["t"] / 60, s1["t"] / 60, color="tab:red", alpha=0.1, lw=0)
    top.set_title("Soak: the twin driven with the fleet link and recording on (red: e-stop held)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
