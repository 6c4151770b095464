"""Benchmark: frames per second for N well-behaved cars while hostile peers attack the same twin.

For each N, a fresh ``donkey-sim serve`` process (default limits) gets N raw-socket cars
that read every frame, then one hostile peer of each kind (tests/twin_peers.py: a
never-reading ``node_position`` flooder, a 1920x1080 PNG camera, a ``load_scene`` flood, and
200 idle connections), and each car counts the telemetry it receives over a window. Without
the hostile peers too, as the baseline. The twin's resident memory is sampled from /proc.

Writes bench/results/twin_isolation.json and docs/img/twin-isolation.png.
Run from the repository root: .venv/bin/python -m bench.twin_isolation
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tests.twin_peers import KINDS, HostilePeers, TwinProcess, received

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results"


def connect_cars(port: int, cars: int) -> list[socket.socket]:
    socks = []
    for _ in range(cars):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        buffer = b""
        while b"car_loaded" not in buffer:
            buffer += sock.recv(65536)
        socks.append(sock)
    return socks


class FrameCounters:
    """A reader per car from its connection on (nothing queues up), counting only inside the window."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.counts = [0] * len(socks)
        self.counting = threading.Event()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._read, args=(i, s), daemon=True) for i, s in enumerate(socks)]
        for thread in self.threads:
            thread.start()

    def _read(self, index: int, sock: socket.socket) -> None:
        buffer = b""
        for data in received(sock, self.stopping, 256 * 1024):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            if self.counting.is_set():
                self.counts[index] += sum(1 for line in lines if b'"telemetry"' in line)

    def rates(self, seconds: float) -> list[float]:
        self.counting.set()
        time.sleep(seconds)
        self.counting.clear()
        self.stopping.set()
        for thread in self.threads:
            thread.join(5)
        return [count / seconds for count in self.counts]


def run(cars: int, hostile: bool, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        twin = TwinProcess("--track", "generated_track", summary=Path(tmp) / "summary.json")
        socks = connect_cars(twin.port, cars)
        counters = FrameCounters(socks)
        peers = HostilePeers(twin.port, KINDS if hostile else ())
        peers.start()
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.5):
                twin.rss_mb()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(1.0)  # the attack is under way
        rates = counters.rates(seconds)
        sampling.set()
        sampler.join()
        peers.stop()
        for sock in socks:
            sock.close()
        summary = twin.stop()
    return {"cars": cars, "hostile": hostile, "min_hz": round(min(rates), 2),
            "mean_hz": round(statistics.fmean(rates), 2), "peak_rss_mb": round(twin.peak_rss_mb, 1),
            "connections_refused": summary["twin"]["connections_refused"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="counting window per run")
    parser.add_argument("--cars", type=int, nargs="+", default=[1, 4, 8, 12])
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    results = []
    for cars in args.cars:
        for hostile in (False, True):
            result = run(cars, hostile, args.seconds)
            results.append(result)
            print(f"{cars:3d} cars, {'hostile peers' if hostile else 'alone        '}: slowest "
                  f"{result['min_hz']:5.2f} Hz, mean {result['mean_hz']:5.2f} Hz, twin peak RSS "
                  f"{result['peak_rss_mb']:.0f} MB", flush=True)
    (RESULTS / "twin_isolation.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, ROOT / "docs" / "img" / "twin-isolation.png")
    print(f"wrote {RESULTS / 'twin_isolation.json'} and docs/img/twin-isolation.png")


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for hostile, style in ((False, "o-"), (True, "s--")):
        rows = [r for r in results if r["hostile"] == hostile]
        label = "with one hostile peer of each kind" if hostile else "alone"
        cars = [r["cars"] for r in rows]
        rate.plot(cars, [r["min_hz"] for r in rows], style, label=f"slowest car, {label}")
        memory.plot(cars, [r["peak_rss_mb"] for r in rows], style, label=label)
    rate.axhline(20.0, color="red", linestyle=":", label="20 Hz")
    rate.set_ylim(0, 25)
    rate.set_xlabel("well-behaved cars")
    rate.set_ylabel("telemetry received per car (Hz)")
    rate.set_title("Frames per car under attack")
    rate.legend(fontsize=8)
    memory.set_xlabel("well-behaved cars")
    memory.set_ylabel("twin peak RSS (MB)")
    memory.set_ylim(0, None)
    memory.set_title("Twin memory")
    memory.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
