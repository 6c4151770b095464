"""`donkey-agent` as a user runs it: model check, run against the twin, config errors, real-time fallback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from simulator.world import TwinCar
from tests.test_cli import start_twin

ROOT = Path(__file__).parent.parent
MODELS = ROOT / "tests" / "fixtures" / "models"
AGENT = [sys.executable, "-m", "agent.cli"]


def agent(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def test_model_check_reports_kind_io_timing_and_outputs(tmp_path: Path) -> None:
    car = TwinCar("generated_track")
    frames = []
    for _ in range(3):
        car.set_controls(0.2, 0.3)
        car.advance(0.5)
        frames.append(car.render())
    np.save(tmp_path / "frames.npy", np.stack(frames))
    result = agent("model", "check", str(MODELS / "localizer.tflite"), "--images", str(tmp_path / "frames.npy"),
                   "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "localizer"
    assert report["inputs"]["img_in"] == {"shape": [1, 120, 160, 3], "dtype": "float32"}
    assert set(report["outputs"]) == {"angle", "throttle", "zloc"}
    assert report["invoke_ms"]["p50"] > 0
    assert len(report["images"]) == 3 and all("location" in item for item in report["images"])
    text = agent("model", "check", str(MODELS / "categorical.tflite"))
    assert text.returncode == 0 and "kind:     categorical" in text.stdout


@pytest.mark.parametrize(("model", "message"), [
    ("rnn.tflite", "Flex delegate for FlexTensorList"),
    ("3d.tflite", "FlexMaxPool3D"),
    ("missing.tflite", "no such model file"),
])
def test_model_check_refuses_what_the_car_cannot_run(model: str, message: str) -> None:
    result = agent("model", "check", str(MODELS / model))
    assert result.returncode == 65
    assert "the car cannot run this model" in result.stderr and message in result.stderr


def test_model_check_rejects_a_wrong_image_array(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 60, 80, 3), np.uint8))
    result = agent("model", "check", str(MODELS / "linear.tflite"), "--images", str(tmp_path / "bad.npy"))
    assert result.returncode == 65 and "expected uint8 (N, 120, 160, 3)" in result.stderr


def test_invalid_config_exits_78_naming_file_key_and_problem(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[drive]\nmax_throttle = 2.0\n[camera]\nbakend = 'twin'\n")
    result = agent("run", "--config", str(config), timeout=30)
    assert result.returncode == 78
    assert f"{config}: drive.max_throttle: Input should be less than or equal to 1" in result.stderr
    assert f"{config}: camera.bakend: unknown key" in result.stderr
    config.write_text("[drive\n")
    result = agent("run", "--config", str(config), timeout=30)
    assert result.returncode == 78 and "not valid TOML" in result.stderr
    result = agent("run", "--config", str(tmp_path / "none.toml"), timeout=30)
    assert result.returncode == 78 and "no such config file" in result.stderr


def test_local_mode_without_a_model_is_a_config_error() -> None:
    result = agent("run", "--sim", "127.0.0.1:9", timeout=30)
    assert result.returncode == 78 and "needs a model" in result.stderr


def test_unreachable_simulator_exits_69(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[twin]\nconnect_timeout_s = 1.0\n")
    result = agent("run", "--config", str(config), "--sim", "127.0.0.1:9", "--mode", "user", timeout=30)
    assert result.returncode == 69 and "cannot reach the simulator" in result.stderr


@pytest.mark.slow
def test_agent_drives_the_twin_over_the_protocol_and_stops_safely(tmp_path: Path) -> None:
    """Closed loop: twin process <- TCP -> agent process with the shipped model; SIGTERM mid-drive."""
    summary = tmp_path / "summary.json"
    twin, port = start_twin("--track", "generated_track", "--summary", str(summary))
    try:
        proc = subprocess.Popen([*AGENT, "run", "--sim", f"127.0.0.1:{port}", "--model", str(ROOT / "models" /
                                 "pilot.tflite"), "--record", str(tmp_path / "tub")], stderr=subprocess.PIPE,
                                text=True)
        time.sleep(12)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        assert "stopped (SIGTERM)" in stderr
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=20)
    (car,) = json.loads(summary.read_text())["cars"]
    assert car["off_track_events"] == 0
    assert car["distance_m"] > 8.0  # about 1.5 m/s for most of 12 s
    assert car["max_abs_cte"] < 0.2
    info = json.loads(agent("tub", "info", str(tmp_path / "tub")).stdout)
    assert info["records"] > 150 and "pilot/angle" in info["inputs"]


REALTIME_SCRIPT = textwrap.dedent(
    """
    import json, logging
    logging.basicConfig(level=logging.WARNING)
    from agent.config import RealtimeConfig
    from agent.core.realtime import configure_realtime
    report = configure_realtime(RealtimeConfig(priority=50, lock_memory=True, cpus=[0]))
    print(json.dumps(report.as_dict()))
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="dropping privileges to show the refusal needs root and setpriv (util-linux)")
def test_realtime_setup_falls_back_cleanly_where_the_os_refuses() -> None:
    # Root without any capability, under limits as a default systemd service gets them.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["prlimit", "--rtprio=0", "--memlock=65536", "setpriv", "--inh-caps=-all", "--bounding-set=-all",
         sys.executable, "-c", REALTIME_SCRIPT],
        capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert any(item.startswith("SCHED_FIFO priority 50: Operation not permitted") for item in report["refused"])
    assert any(item.startswith("mlockall") for item in report["refused"])
    assert "CPU affinity [0]" in report["applied"]
    assert result.stderr.count("real-time set-up partly refused, driving anyway") == 1


def test_a_model_the_car_cannot_run_exits_65_and_leaves_neutral(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    twin, port = start_twin("--track", "generated_track", "--summary", str(summary))
    try:
        result = agent("run", "--sim", f"127.0.0.1:{port}", "--model", str(MODELS / "rnn.tflite"), timeout=60)
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(timeout=20)
    assert result.returncode == 65, result.stderr
    assert "Flex delegate" in result.stderr
    (car,) = json.loads(summary.read_text())["cars"]
    assert car["distance_m"] < 0.05  # it never moved
