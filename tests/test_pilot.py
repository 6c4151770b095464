"""Our autopilot against DonkeyCar's own TFLite pipeline (its TfLite interpreter plus the Keras* pilot).

The model files are DonkeyCar's builders' output (tests/fixtures/models/build.py); both sides run
the real LiteRT interpreter on the same file and the same frames.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from agent.pilot import Autopilot, ModelError
from simulator.world import TwinCar
from tests.conftest import import_donkeycar_tub

MODELS = Path(__file__).parent / "fixtures" / "models"
SUPPORTED = ["linear", "categorical", "inferred", "behavior", "localizer", "imu", "memory"]


def frames() -> list[np.ndarray]:
    car = TwinCar("mountain_track", seed=5)
    out = []
    for i in range(4):
        car.set_controls(0.3 * (-1) ** i, 0.3)
        car.advance(0.7)
        out.append(car.render())
    rng = np.random.default_rng(9)
    out.append(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    out.append(np.zeros((120, 160, 3), np.uint8))
    return out


def donkeycar_pilot(kind: str):
    import_donkeycar_tub()  # skips with a reason where donkeycar cannot be installed
    logging.getLogger("donkeycar").setLevel(logging.WARNING)
    from donkeycar.parts import keras
    from donkeycar.parts.interpreter import TfLite

    make = {
        "linear": lambda i: keras.KerasLinear(interpreter=i),
        "categorical": lambda i: keras.KerasCategorical(interpreter=i, throttle_range=0.8),
        "inferred": lambda i: keras.KerasInferred(interpreter=i),
        "behavior": lambda i: keras.KerasBehavioral(interpreter=i, throttle_range=0.8, num_behavior_inputs=2),
        "localizer": lambda i: keras.KerasLocalizer(interpreter=i, num_locations=8),
        "imu": lambda i: keras.KerasIMU(interpreter=i),
        "memory": lambda i: keras.KerasMemory(interpreter=i, mem_length=3),
    }[kind]
    pilot = make(TfLite())
    pilot.load(str(MODELS / f"{kind}.tflite"))
    return pilot


@pytest.mark.donkeycar
@pytest.mark.parametrize("kind", SUPPORTED)
def test_outputs_equal_donkeycars_pipeline(kind: str) -> None:
    from donkeycar.utils import normalize_image

    theirs = donkeycar_pilot(kind)
    ours = Autopilot(MODELS / f"{kind}.tflite")
    assert ours.kind == kind
    imu = np.array([0.1, -0.2, 9.8, 0.01, 0.02, -0.3])
    behavior = np.array([0.0, 1.0])
    if kind == "behavior":
        ours.set_behavior(1)
    memory = deque([[0.0, 0.0]] * 3)
    for frame in frames():
        mine = ours.run(frame, imu=imu)
        if kind == "imu":
            expected = theirs.run(frame, imu)
        elif kind == "behavior":
            expected = theirs.run(frame, behavior)
        elif kind == "memory":
            # KerasMemory.run needs TensorFlow (tf.TensorShape); this is its body without it.
            expected = theirs.inference_from_dict(
                {"img_in": normalize_image(frame), "mem_in": np.array(memory).reshape(6)})
            memory.popleft()
            memory.append(list(expected))
        else:
            expected = theirs.run(frame)
        assert mine.angle == pytest.approx(float(expected[0]), abs=1e-5)
        assert mine.throttle == pytest.approx(float(expected[1]), abs=1e-5)
        if kind == "localizer":
            assert mine.location == int(expected[2])
        else:
            assert mine.location is None


def test_outputs_depend_on_the_frame() -> None:
    pilot = Autopilot(MODELS / "linear.tflite")
    outputs = {round(pilot.run(frame).angle, 6) for frame in frames()}
    assert len(outputs) >= 4  # not a constant: the image reaches the network


@pytest.mark.parametrize(("kind", "ops"), [("rnn", "FlexTensorListReserve"), ("3d", "FlexMaxPool3D")])
def test_flex_models_are_refused_naming_the_missing_ops(kind: str, ops: str) -> None:
    with pytest.raises(ModelError, match=f"Flex delegate for .*{ops}"):
        Autopilot(MODELS / f"{kind}.tflite")


def test_corrupt_truncated_and_missing_files_are_refused_clearly(tmp_path: Path) -> None:
    data = (MODELS / "linear.tflite").read_bytes()
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match=r"truncated\.tflite"):
        Autopilot(truncated)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x00" * 4 + b"TFL3" + bytes(range(256)) * 40)
    with pytest.raises(ModelError, match=r"garbage\.tflite"):
        Autopilot(garbage)
    keras_file = tmp_path / "pilot.h5"
    keras_file.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ModelError, match="not a TensorFlow Lite model"):
        Autopilot(keras_file)
    with pytest.raises(ModelError, match="no such model file"):
        Autopilot(tmp_path / "missing.tflite")


def test_kind_override_must_match_the_signature() -> None:
    assert Autopilot(MODELS / "linear.tflite", kind="linear").kind == "linear"
    with pytest.raises(ModelError, match="configured as 'categorical'"):
        Autopilot(MODELS / "linear.tflite", kind="categorical")


def test_wrong_frame_size_and_missing_imu_are_errors() -> None:
    pilot = Autopilot(MODELS / "linear.tflite")
    with pytest.raises(ModelError, match="frame is"):
        pilot.run(np.zeros((240, 320, 3), np.uint8))
    with pytest.raises(ModelError, match="imu readings"):
        Autopilot(MODELS / "imu.tflite").run(np.zeros((120, 160, 3), np.uint8))


def test_memory_model_feeds_back_its_own_outputs() -> None:
    pilot = Autopilot(MODELS / "memory.tflite", mem_start_speed=0.2)
    assert list(pilot.memory) == [(0.0, 0.2)] * 3
    out = pilot.run(frames()[0])
    assert pilot.memory[-1] == (out.angle, out.throttle)
    pilot.reset()
    assert list(pilot.memory) == [(0.0, 0.2)] * 3


def test_tflite_runtime_fallback_gives_the_same_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ai-edge-litert the car falls back to tflite-runtime, with identical results."""
    import sys

    if sys.version_info[:2] != (3, 11):
        pytest.importorskip("tflite_runtime", reason="tflite-runtime has no wheels for Python >= 3.12")
    preferred = Autopilot(MODELS / "categorical.tflite")
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    fallback = Autopilot(MODELS / "categorical.tflite")
    assert (preferred.runtime, fallback.runtime) == ("ai_edge_litert", "tflite_runtime")
    for frame in frames():
        assert fallback.run(frame) == preferred.run(frame)


def test_no_runtime_at_all_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from agent.pilot.runtime import RuntimeUnavailableError, interpreter_class

    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeUnavailableError, match="pip install ai-edge-litert"):
        interpreter_class()
