"""``donkey-agent model check``: load a model exactly as the car would and report what it does."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.pilot.model import Autopilot, ModelError

TIMING_RUNS = 50


def check_model(path: Path, *, images: Path | None = None, kind: str = "auto", num_threads: int = 2) -> dict[str, Any]:
    """A report dict; raises ModelError (or ValueError for a bad image file) with a clear message."""
    pilot = Autopilot(path, kind=kind, num_threads=num_threads)
    frames: np.ndarray | None = None
    if images is not None:
        try:
            frames = np.load(images, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{images}: not a readable .npy array: {exc}") from None
        expected = (*pilot.image_shape[:2], 3)
        if frames.ndim != 4 or frames.shape[1:] != expected or frames.dtype != np.uint8:
            raise ValueError(f"{images}: expected uint8 (N, {expected[0]}, {expected[1]}, 3) frames, "
                             f"got {frames.dtype} {frames.shape}")
    probe = frames[0] if frames is not None and len(frames) else np.full((*pilot.image_shape[:2], 3), 128, np.uint8)
    imu = np.zeros(6) if pilot.kind == "imu" else None
    timings = []
    for _ in range(TIMING_RUNS):
        pilot.prepare(probe, imu=imu)
        started = time.perf_counter()
        pilot.invoke()
        timings.append((time.perf_counter() - started) * 1e3)
    pilot.reset()
    report: dict[str, Any] = {
        "model": str(path),
        "sha256": _sha256(path),
        "kind": pilot.kind,
        "runtime": pilot.runtime,
        "num_threads": num_threads,
        "inputs": {name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in pilot.inputs.items()},
        "outputs": {name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in pilot.outputs.items()},
        "invoke_ms": {"p50": round(statistics.median(timings), 3),
                      "p99": round(float(np.percentile(timings, 99)), 3), "runs": TIMING_RUNS},
    }
    if frames is not None:
        results = []
        for frame in frames:
            output = pilot.run(frame, imu=imu)
            item: dict[str, Any] = {"angle": round(output.angle, 6), "throttle": round(output.throttle, 6)}
            if output.location is not None:
                item["location"] = output.location
            results.append(item)
        report["images"] = results
    return report


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"model:    {report['model']}",
        f"sha256:   {report['sha256']}",
        f"kind:     {report['kind']} (runtime {report['runtime']}, {report['num_threads']} threads)",
        "inputs:   " + ", ".join(f"{n} {v['dtype']}{v['shape']}" for n, v in report["inputs"].items()),
        "outputs:  " + ", ".join(f"{n} {v['dtype']}{v['shape']}" for n, v in report["outputs"].items()),
        f"invoke:   p50 {report['invoke_ms']['p50']:.2f} ms, p99 {report['invoke_ms']['p99']:.2f} ms "
        f"({report['invoke_ms']['runs']} runs)",
    ]
    for i, item in enumerate(report.get("images", [])):
        extra = f"  location {item['location']}" if "location" in item else ""
        lines.append(f"image {i:4d}: angle {item['angle']:+.4f}  throttle {item['throttle']:+.4f}{extra}")
    return "\n".join(lines)


def main_check(path: Path, images: Path | None, as_json: bool, kind: str) -> tuple[int, str]:
    try:
        report = check_model(path, images=images, kind=kind)
    except (ModelError, ValueError) as exc:
        return 65, f"donkey-agent model check: the car cannot run this model:\n{exc}"
    return 0, json.dumps(report, indent=2) if as_json else format_report(report)
