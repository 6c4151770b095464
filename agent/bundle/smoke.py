"""The smoke test: load a candidate model as the car does, in a separate process, and run it.

``python -m agent.bundle.smoke MODEL --budget-ms N --json`` loads the model with the car's own loader
(``agent.pilot.model.Autopilot``: the same runtime, vetting and kind detection as the drive core),
runs reference frames (a few synthetic ones and, optionally, recorded ones from an ``.npy``), requires
finite outputs on every one and an invoke p99 within the budget, and prints one JSON report.

A separate process, because a model is untrusted input for a C++ interpreter: one that crashes it,
hangs it or eats memory must cost the car a refused update, not the daemon. ``run_smoke`` (the
parent side) enforces a timeout, kills the child's whole process group, and turns every way the
child can fail (exit code, signal, silence, garbage) into a SmokeError that says which.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle.errors import SmokeError

CHILD = (sys.executable, "-m", "agent.bundle.smoke")
MAX_REPORT_BYTES = 256 * 1024
SYNTHETIC_FRAMES = ("grey", "black", "white", "gradient", "noise", "stripes")


@dataclass(frozen=True)
class SmokeReport:
    kind: str
    image_shape: tuple[int, ...]
    invoke_p50_ms: float
    invoke_p99_ms: float
    invoke_max_ms: float
    frames: int
    runtime: str
    seconds: float  # the whole child process, start to report


def run_smoke(model: Path, *, budget_ms: float, timeout_s: float = 60.0, frames: Path | None = None,
              kind: str = "auto", num_threads: int = 2, runs: int = 50, nice: int = 10,
              command: Sequence[str] = CHILD) -> SmokeReport:
    """Smoke-test ``model`` in a child process; returns its report or raises SmokeError.

    ``command`` is the child's argv prefix (tests put a misbehaving stand-in there).
    """
    argv = [*command, str(model), "--budget-ms", str(budget_ms), "--json", "--kind", kind,
            "--num-threads", str(num_threads), "--runs", str(runs), "--nice", str(nice)]
    if frames is not None:
        argv += ["--frames", str(frames)]
    started = time.monotonic()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # its own process group: killed whole, threads and all
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(child)
        child.communicate()
        raise SmokeError(f"{model}: the smoke test did not finish within {timeout_s:.0f} s (a hanging model?); "
                         "killed it") from None
    finally:
        if child.poll() is None:
            _kill_group(child)
            child.wait()
    seconds = time.monotonic() - started
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else "?"
        raise SmokeError(f"{model}: the smoke test process died of {name} (the interpreter crashed on this model)"
                         + (f": {' | '.join(tail)}" if tail else ""))
    report = _parse_report(stdout)
    if report is None:
        raise SmokeError(f"{model}: the smoke test process exited {child.returncode} without a report"
                         + (f": {' | '.join(tail)}" if tail else ""))
    if not report.get("ok"):
        raise SmokeError(f"{model}: {report.get('error', 'failed (no reason given)')}")
    try:
        invoke = report["invoke_ms"]
        return SmokeReport(str(report["kind"]), tuple(int(d) for d in report["image_shape"]),
                           float(invoke["p50"]), float(invoke["p99"]), float(invoke["max"]), int(report["frames"]),
                           str(report["runtime"]), seconds)
    except (KeyError, TypeError, ValueError) as exc:
        raise SmokeError(f"{model}: the smoke test's report is incomplete ({exc})") from None


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


def _parse_report(stdout: bytes) -> dict[str, Any] | None:
    if len(stdout) > MAX_REPORT_BYTES:
        return None
    for line in reversed(stdout.decode("utf-8", "replace").strip().splitlines()):
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        return report if isinstance(report, dict) else None
    return None


# -- the child ---------------------------------------------------------------------------------------
def reference_frames(shape: tuple[int, int], extra: Path | None = None) -> list[Any]:
    """Synthetic frames that exercise the input range (flat, extremes, gradient, noise, stripes), plus recorded ones."""
    import numpy as np

    height, width = shape
    rng = np.random.default_rng(0)
    gradient = np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8)[None, :, None], (height, width, 3))
    stripes = np.zeros((height, width, 3), np.uint8)
    stripes[:, ::8] = 255
    frames = [np.full((height, width, 3), 128, np.uint8), np.zeros((height, width, 3), np.uint8),
              np.full((height, width, 3), 255, np.uint8), np.ascontiguousarray(gradient),
              rng.integers(0, 256, (height, width, 3), dtype=np.uint8), stripes]
    if extra is not None:
        recorded = np.load(extra, allow_pickle=False)
        if recorded.ndim != 4 or recorded.shape[1:] != (height, width, 3) or recorded.dtype != np.uint8:
            raise ValueError(f"{extra}: expected uint8 (N, {height}, {width}, 3) frames, got "
                             f"{recorded.dtype} {recorded.shape}")
        frames.extend(recorded[:64])
    return frames


def smoke(model: Path, *, budget_ms: float, frames: Path | None, kind: str, num_threads: int,
          runs: int) -> dict[str, Any]:
    """The child's work; every failure becomes ``{"ok": false, "error": ...}``."""
    import numpy as np

    from agent.pilot.model import Autopilot, ModelError

    try:
        pilot = Autopilot(model, kind=kind, num_threads=num_threads)
    except ModelError as exc:
        return {"ok": False, "error": f"the car cannot load it: {exc}"}
    report: dict[str, Any] = {"kind": pilot.kind, "image_shape": list(pilot.image_shape), "runtime": pilot.runtime}
    try:
        images = reference_frames(pilot.image_shape[:2], frames)
    except (OSError, ValueError) as exc:
        return {**report, "ok": False, "error": f"reference frames: {exc}"}
    imu = np.zeros(6) if pilot.kind == "imu" else None
    outputs = []
    for index, image in enumerate(images):
        try:
            output = pilot.run(image, imu=imu)
        except ModelError as exc:
            name = SYNTHETIC_FRAMES[index] if index < len(SYNTHETIC_FRAMES) else f"recorded #{index - 6}"
            return {**report, "ok": False, "error": f"frame {index} ({name}): {exc}"}
        outputs.append([round(output.angle, 6), round(output.throttle, 6)])
    pilot.reset()
    timings = []
    for run in range(runs + 5):
        pilot.prepare(images[run % len(images)], imu=imu)
        started = time.perf_counter()
        pilot.invoke()
        if run >= 5:  # the first invokes warm caches and thread pools; the car's warm-up does the same
            timings.append((time.perf_counter() - started) * 1e3)
    p50, p99 = (float(np.percentile(timings, q)) for q in (50, 99))
    report.update({"frames": len(images), "outputs": outputs,
                   "invoke_ms": {"p50": round(p50, 3), "p99": round(p99, 3), "max": round(max(timings), 3),
                                 "runs": runs},
                   "budget_ms": budget_ms})
    if p99 > budget_ms:
        return {**report, "ok": False, "error": f"invoke p99 {p99:.2f} ms is over the budget of {budget_ms} ms "
                                                f"(models.smoke_budget_ms; p50 {p50:.2f} ms, {runs} runs)"}
    return {**report, "ok": True}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.bundle.smoke",
                                     description="Smoke-test a .tflite as the car would load it.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--budget-ms", type=float, required=True, help="largest acceptable invoke p99")
    parser.add_argument("--frames", type=Path, help="an (N, H, W, 3) uint8 .npy of recorded frames")
    parser.add_argument("--kind", default="auto")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--nice", type=int, default=0, help="lower this process's priority (the car drives on)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # before any thread starts, so LiteRT's workers inherit it
    report = smoke(args.model, budget_ms=args.budget_ms, frames=args.frames, kind=args.kind,
                   num_threads=args.num_threads, runs=max(args.runs, 1))
    if args.json:
        print(json.dumps(report))
    else:
        print("ok" if report["ok"] else f"failed: {report['error']}")
        for key in ("kind", "image_shape", "invoke_ms"):
            if key in report:
                print(f"{key}: {report[key]}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
