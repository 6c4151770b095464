"""DonkeyCar .tflite autopilots, run unchanged: kinds matched by signature name, outputs decoded as DonkeyCar does.

Supported kinds and their signatures (Keras layer names, as DonkeyCar's builders make them):

| kind | inputs | outputs | decoding |
| --- | --- | --- | --- |
| linear | img_in | n_outputs0, n_outputs1 | angle, throttle |
| inferred | img_in | n_outputs0 | throttle = exp(-m/2) - 0.05 m, m = (angle + 1) / 2 |
| memory | img_in, mem_in | n_outputs0, n_outputs1 | as linear; mem_in = the last outputs |
| categorical | img_in | angle_out (15), throttle_out (20) | argmax bins |
| behavior | img_in, xbehavior_in | angle_out, throttle_out | as categorical |
| localizer | img_in | angle, throttle, zloc | (angle, throttle, argmax zloc) |
| imu | img_in, imu_in | out_0, out_1 | angle, throttle |

``rnn`` and ``3d`` models need TensorFlow's Flex delegate and are refused at load, naming the
operators. The interpreter is created by whoever constructs ``Autopilot``: the drive core
does it inside its own thread so LiteRT's worker threads inherit its scheduling.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from agent.errors import AgentError
from agent.pilot.modelfile import ModelFileError, custom_operators, read_model
from agent.pilot.runtime import interpreter_class

KIND_SIGNATURES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"img_in"}), frozenset({"n_outputs0", "n_outputs1"})),
    "inferred": (frozenset({"img_in"}), frozenset({"n_outputs0"})),
    "memory": (frozenset({"img_in", "mem_in"}), frozenset({"n_outputs0", "n_outputs1"})),
    "categorical": (frozenset({"img_in"}), frozenset({"angle_out", "throttle_out"})),
    "behavior": (frozenset({"img_in", "xbehavior_in"}), frozenset({"angle_out", "throttle_out"})),
    "localizer": (frozenset({"img_in"}), frozenset({"angle", "throttle", "zloc"})),
    "imu": (frozenset({"img_in", "imu_in"}), frozenset({"out_0", "out_1"})),
}
FLEX_KINDS = {"model_outputs": "rnn", "outputs": "3d"}  # their sole output names

# DonkeyCar normalises in float64 and then casts to float32; a lookup table gives the same
# float32 values without the float64 temporary.
_NORMALISE = (np.arange(256, dtype=np.float64) * (1.0 / 255.0)).astype(np.float32)
_GREY = np.array([0.299, 0.587, 0.114])


class ModelError(AgentError, ValueError):
    """A model the car cannot run, or an input it cannot take; the message says why."""


@dataclass(frozen=True)
class PilotOutput:
    angle: float
    throttle: float
    location: int | None = None  # localizer models: the predicted track segment


def _linear_unbin(bins: NDArray[np.float32], n: int, offset: float, span: float) -> float:
    """DonkeyCar's ``utils.linear_unbin``."""
    return float(int(np.argmax(bins)) * (span / (n + offset)) + offset)


def inferred_throttle(angle: float) -> float:
    """DonkeyCar's ``utils.throttle`` (used by the inferred kind)."""
    magnitude = (max(-1.0, min(1.0, angle)) + 1.0) / 2.0
    return 1.0 / math.exp(magnitude * 0.5) - 0.05 * magnitude


def detect_kind(inputs: set[str], outputs: set[str]) -> str | None:
    for kind, (kind_inputs, kind_outputs) in KIND_SIGNATURES.items():
        if inputs == kind_inputs and outputs == kind_outputs:
            return kind
    return None


class Autopilot:
    """One loaded model. ``run`` takes an (H, W, 3) uint8 RGB frame and returns a PilotOutput."""

    def __init__(
        self,
        path: str | Path,
        *,
        kind: str = "auto",
        num_threads: int = 2,
        categorical_throttle_range: float = 0.8,  # DonkeyCar's MODEL_CATEGORICAL_MAX_THROTTLE_RANGE
        mem_start_speed: float = 0.0,
    ) -> None:
        self.path = Path(path)
        try:
            data = read_model(self.path)
            operators = custom_operators(data)
        except ModelFileError as exc:
            message = str(exc)
            raise ModelError(message if message.startswith(str(self.path)) else f"{self.path}: {message}") from None
        flex = sorted({op for op in operators if op.startswith("Flex")})
        if flex:
            raise ModelError(
                f"{self.path}: needs TensorFlow's Flex delegate for {', '.join(flex)}; the car's LiteRT runtime has "
                "no Flex ops (DonkeyCar's rnn and 3d models). Train a linear, categorical, inferred, memory, "
                "behavior, localizer or imu model instead."
            )
        interpreter_type, self.runtime = interpreter_class()
        try:
            self._interpreter = interpreter_type(model_content=data, num_threads=num_threads)
            signatures = self._interpreter.get_signature_list()
            if "serving_default" not in signatures:
                raise ModelError(f"{self.path}: no 'serving_default' signature; was it converted by DonkeyCar?")
            self._interpreter.allocate_tensors()
            runner = self._interpreter.get_signature_runner("serving_default")
            input_details: dict[str, Any] = runner.get_input_details()
            output_details: dict[str, Any] = runner.get_output_details()
            del runner  # inference goes through invoke() on preallocated tensors
        except ModelError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{self.path}: the LiteRT interpreter cannot load it: {exc}") from None

        inputs, outputs = set(input_details), set(output_details)
        detected = detect_kind(inputs, outputs)
        if kind == "auto":
            if detected is None:
                flex_kind = FLEX_KINDS.get(next(iter(outputs))) if len(outputs) == 1 else None
                hint = f" (it looks like a DonkeyCar {flex_kind} model)" if flex_kind else ""
                raise ModelError(
                    f"{self.path}: unknown model signature{hint}: inputs {sorted(inputs)}, outputs {sorted(outputs)}"
                )
            kind = detected
        elif kind not in KIND_SIGNATURES:
            raise ModelError(f"unknown model kind {kind!r}; known: {', '.join(KIND_SIGNATURES)}")
        elif (inputs, outputs) != KIND_SIGNATURES[kind]:
            expected_in, expected_out = KIND_SIGNATURES[kind]
            raise ModelError(
                f"{self.path}: configured as {kind!r} but its signature is inputs {sorted(inputs)}, outputs "
                f"{sorted(outputs)} (a {kind} model has inputs {sorted(expected_in)}, outputs {sorted(expected_out)})"
            )
        self.kind = kind
        self.inputs = {name: (tuple(int(d) for d in detail["shape"]), np.dtype(detail["dtype"]).name)
                       for name, detail in input_details.items()}
        self.outputs = {name: (tuple(int(d) for d in detail["shape"]), np.dtype(detail["dtype"]).name)
                        for name, detail in output_details.items()}
        image_shape, image_dtype = self.inputs["img_in"]
        if len(image_shape) != 4 or image_shape[0] != 1 or image_shape[3] not in (1, 3) or image_dtype != "float32":
            raise ModelError(f"{self.path}: img_in is {image_dtype}{list(image_shape)}; expected float32 [1, H, W, 3]")
        self.image_shape = image_shape[1:]
        self._index = {name: int(d["index"]) for name, d in {**input_details, **output_details}.items()}
        self.throttle_range = categorical_throttle_range
        self.mem_start_speed = mem_start_speed
        self.memory: deque[tuple[float, float]] = deque()
        if kind == "memory":
            length = self.inputs["mem_in"][0][1] // 2
            self.memory = deque([(0.0, mem_start_speed)] * length, maxlen=length)
        self.behavior = np.zeros(self.inputs["xbehavior_in"][0][1], np.float32) if kind == "behavior" else None
        if self.behavior is not None:
            self.behavior[0] = 1.0

    # -- inference -----------------------------------------------------------------------------
    def run(self, image: NDArray[np.uint8], *, imu: NDArray[np.floating] | None = None) -> PilotOutput:
        """One inference. Raises ModelError for an image of the wrong shape or non-finite outputs."""
        self.prepare(image, imu=imu)
        self.invoke()
        return self.result()

    def prepare(self, image: NDArray[np.uint8], *, imu: NDArray[np.floating] | None = None) -> None:
        """Write the model's inputs in place (the drive core times this as 'preprocess')."""
        interpreter = self._interpreter
        if image.shape != self.image_shape:
            if image.shape[:2] == self.image_shape[:2] and self.image_shape[2] == 1 and image.shape[2] == 3:
                image = (image @ _GREY).astype(np.uint8)[..., None]
            else:
                raise ModelError(f"frame is {image.shape}, the model takes {self.image_shape}")
        np.take(_NORMALISE, image, out=interpreter.tensor(self._index["img_in"])()[0])
        if self.kind == "memory":
            interpreter.tensor(self._index["mem_in"])()[0] = np.ravel(self.memory)
        elif self.kind == "behavior":
            interpreter.tensor(self._index["xbehavior_in"])()[0] = self.behavior
        elif self.kind == "imu":
            if imu is None:
                raise ModelError("an imu model needs imu readings (acl_x, acl_y, acl_z, gyr_x, gyr_y, gyr_z)")
            interpreter.tensor(self._index["imu_in"])()[0] = imu

    def invoke(self) -> None:
        try:
            self._interpreter.invoke()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"inference failed: {exc}") from None

    def result(self) -> PilotOutput:
        """Decode the outputs of the last invoke (and feed a memory model's history)."""
        result = self._decode()
        if not (math.isfinite(result.angle) and math.isfinite(result.throttle)):
            raise ModelError(f"non-finite model output: angle {result.angle}, throttle {result.throttle}")
        if self.kind == "memory":
            self.memory.append((result.angle, result.throttle))
        return result

    def _output(self, name: str) -> NDArray[np.float32]:
        return self._interpreter.tensor(self._index[name])()[0]

    def _decode(self) -> PilotOutput:
        kind = self.kind
        if kind in ("linear", "memory"):
            return PilotOutput(float(self._output("n_outputs0")[0]), float(self._output("n_outputs1")[0]))
        if kind == "imu":
            return PilotOutput(float(self._output("out_0")[0]), float(self._output("out_1")[0]))
        if kind == "inferred":
            angle = float(self._output("n_outputs0")[0])
            return PilotOutput(angle, inferred_throttle(angle))
        if kind in ("categorical", "behavior"):
            angle_bins, throttle_bins = self._output("angle_out"), self._output("throttle_out")
            return PilotOutput(
                _linear_unbin(angle_bins, 15, -1.0, 2.0),
                _linear_unbin(throttle_bins, len(throttle_bins), 0.0, self.throttle_range),
            )
        # localizer
        return PilotOutput(float(self._output("angle")[0]), float(self._output("throttle")[0]),
                           int(np.argmax(self._output("zloc"))))

    def set_behavior(self, index: int) -> None:
        """Behaviour models: which one-hot behaviour (e.g. lane) to drive."""
        if self.behavior is None:
            raise ModelError(f"a {self.kind} model has no behaviour input")
        if not 0 <= index < len(self.behavior):
            raise ModelError(f"behaviour {index} is outside 0..{len(self.behavior) - 1}")
        self.behavior[:] = 0.0
        self.behavior[index] = 1.0

    def reset(self) -> None:
        """Forget the memory of a memory model (e.g. after a stop)."""
        if self.kind == "memory":
            self.memory.extend([(0.0, self.mem_start_speed)] * (self.memory.maxlen or 0))
