"""The smoke test in its own process: the real model on the car's LiteRT loader, and children that misbehave.

The misbehaving children are stand-ins for the smoke process (a hang, a crash, garbage): what is
tested there is the parent, which must survive all of them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.bundle.errors import SmokeError
from agent.bundle.smoke import run_smoke
from tests.bundles import MODEL, nan_model


def test_the_shipped_model_passes_with_recorded_frames(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).integers(0, 256, (3, 120, 160, 3), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", frames)
    report = run_smoke(MODEL, budget_ms=200.0, frames=tmp_path / "frames.npy", runs=20)
    assert report.kind == "linear" and report.image_shape == (120, 160, 3) and report.frames == 9
    assert 0 < report.invoke_p50_ms <= report.invoke_p99_ms <= report.invoke_max_ms
    assert report.runtime in ("ai_edge_litert", "tflite_runtime")


def test_a_model_that_answers_nan_fails(tmp_path: Path) -> None:
    with pytest.raises(SmokeError, match=r"frame 0 \(grey\): non-finite model output: angle nan"):
        run_smoke(nan_model(tmp_path / "nan.tflite"), budget_ms=200.0, runs=5)


def test_a_truncated_model_cannot_load(tmp_path: Path) -> None:
    (tmp_path / "cut.tflite").write_bytes(MODEL.read_bytes()[:100_000])
    with pytest.raises(SmokeError, match=r"the car cannot load it: .*corrupt TensorFlow Lite flatbuffer"):
        run_smoke(tmp_path / "cut.tflite", budget_ms=200.0)


def test_a_model_over_its_budget_fails() -> None:
    with pytest.raises(SmokeError, match=r"invoke p99 .* ms is over the budget of 0.001 ms"):
        run_smoke(MODEL, budget_ms=0.001, runs=5)


def test_recorded_frames_of_the_wrong_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "frames.npy", np.zeros((2, 60, 80, 3), np.uint8))
    with pytest.raises(SmokeError, match=r"reference frames: .* expected uint8 \(N, 120, 160, 3\)"):
        run_smoke(MODEL, budget_ms=200.0, frames=tmp_path / "frames.npy")


def stand_in(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_hanging_child_is_killed_with_its_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '300'])\n"
            "open(sys.argv[1], 'w').write(str(child.pid))\n"
            "time.sleep(300)\n")
    started = time.monotonic()
    with pytest.raises(SmokeError, match=r"did not finish within 1 s .*killed it"):
        run_smoke(pid_file, budget_ms=10.0, timeout_s=1.0, command=stand_in(code))
    assert time.monotonic() - started < 5
    status = Path(f"/proc/{pid_file.read_text()}/status")
    deadline = time.monotonic() + 5
    while status.exists() and "State:\tZ" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or dead awaiting its reaper


@pytest.mark.parametrize(("code", "expected"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "died of SIGSEGV"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "died of SIGKILL"),
    ("import sys; print('hello'); sys.exit(0)", "exited 0 without a report"),
    ("import sys; print('Traceback: boom', file=sys.stderr); sys.exit(3)", "exited 3 without a report: Traceback"),
    ("print('{\"ok\": true}')", "report is incomplete"),
    ("print('x' * 400000)", "without a report"),
])
def test_a_misbehaving_child_cannot_hurt_the_caller(code: str, expected: str) -> None:
    with pytest.raises(SmokeError, match=expected):
        run_smoke(MODEL, budget_ms=10.0, timeout_s=10.0, command=stand_in(code))

