"""The rollout of a new model on a running car: shadow trial on live frames, probation, rollback verdicts.

Real parts: the LiteRT interpreter on real .tflite files (the shipped autopilot, a differently trained model of
the same kind, a model that outputs NaN), frames rendered by the twin. The drive thread's side is played by the
test: it offers each frame with the active model's answer through the same ShadowTap the core uses.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from agent.core.decide import Inference
from agent.core.handoff import Event
from agent.core.shadow import ShadowTap
from agent.hw.interfaces import Frame
from agent.pilot import Autopilot
from agent.rollout.probation import Probation, ProbationLimits
from agent.rollout.shadow import ShadowCriteria, ShadowTrial
from simulator.world import TwinCar

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "pilot.tflite"
FIXTURES = ROOT / "tests" / "fixtures" / "models"


def twin_frames(count: int) -> list[np.ndarray]:
    car = TwinCar("generated_track", seed=3)
    frames = []
    for _ in range(count):
        car.set_controls(0.1, 0.3)
        car.advance(0.05)
        frames.append(car.render())
    return frames


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return twin_frames(60)


def run_trial(candidate: Path, frames: list[np.ndarray], criteria: ShadowCriteria,
              period: float = 0.01) -> ShadowTrial:
    active = Autopilot(SHIPPED)
    tap = ShadowTap()
    trial = ShadowTrial(tap, Autopilot(candidate), criteria, {"name": candidate.stem})
    trial.start()
    try:
        for seq, image in enumerate(frames, 1):
            output = active.run(image)
            tap.offer(Frame(seq, time.monotonic(), image), Inference(output.angle, output.throttle, invoke_s=0.001))
            time.sleep(period)
        deadline = time.monotonic() + 5
        while trial.frames + trial.failures + trial.skipped < len(frames) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        assert trial.stop()
        tap.close()
    return trial


def test_the_same_model_in_shadow_agrees_exactly_and_passes(frames: list[np.ndarray]) -> None:
    trial = run_trial(SHIPPED, frames, ShadowCriteria(min_frames=40))
    summary = trial.summary()
    assert summary["frames"] >= 40 and summary["failures"] == 0
    assert summary["steering_error_max"] < 1e-5 and summary["throttle_error_max"] < 1e-5
    assert summary["candidate_invoke_ms"]["p99"] is not None
    assert trial.verdict() == (True, [])


def test_a_model_that_disagrees_is_rejected_with_the_bounds_it_broke(frames: list[np.ndarray]) -> None:
    trial = run_trial(FIXTURES / "linear.tflite", frames, ShadowCriteria(min_frames=40, max_steering_error_mean=0.02,
                                                                         max_throttle_error_mean=0.02))
    passed, reasons = trial.verdict()
    assert passed is False and any("error_mean" in reason for reason in reasons)


def test_a_model_that_outputs_nan_fails_the_trial_and_the_thread_survives(frames: list[np.ndarray]) -> None:
    glare = [frame.copy() for frame in frames[:10]]
    for frame in glare:
        frame[0, 0] = 255  # nan.tflite answers NaN when the top-left pixel is saturated
    trial = run_trial(FIXTURES / "nan.tflite", glare, ShadowCriteria(min_frames=5))
    passed, reasons = trial.verdict()
    assert passed is False and "non-finite" in reasons[0]
    assert trial.failures >= 5 and trial.frames == 0


def test_too_few_frames_is_no_verdict_yet(frames: list[np.ndarray]) -> None:
    trial = run_trial(SHIPPED, frames[:5], ShadowCriteria(min_frames=100))
    assert trial.verdict() == (None, [f"{trial.frames} of 100 frames"])


def test_a_slow_shadow_skips_frames_and_never_holds_the_offering_thread(frames: list[np.ndarray]) -> None:
    """The offering side (the drive thread) never waits, however slow the candidate: offers are overwritten."""
    tap = ShadowTap()

    class Slow:
        def __init__(self) -> None:
            self.inner = Autopilot(SHIPPED)

        def prepare(self, image: np.ndarray, imu: object = None) -> None:
            self.inner.prepare(image)

        def invoke(self) -> None:
            time.sleep(0.05)
            self.inner.invoke()

        def result(self) -> object:
            return self.inner.result()

    trial = ShadowTrial(tap, Slow(), ShadowCriteria(min_frames=1), {"name": "slow"})
    trial.start()
    worst = 0.0
    try:
        for seq, image in enumerate(frames, 1):
            started = time.perf_counter()
            tap.offer(Frame(seq, time.monotonic(), image), Inference(0.0, 0.0))
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.002)
        time.sleep(0.2)
    finally:
        trial.stop()
        tap.close()
    assert trial.skipped > len(frames) // 2 and trial.frames >= 1
    assert worst < 0.005  # an offer is a reference store and an eventfd write


# -- probation -------------------------------------------------------------------------------------------------
def fault(kind: str, at: float) -> Event:
    return Event("fault", {"fault": kind, "detail": "", "latched": False}, at)


def test_probation_passes_a_quiet_window() -> None:
    probation = Probation({"name": "v2"}, 100.0, ProbationLimits(window_s=60))
    probation.observe(fault("stale_frame", 110.0))  # not the model's doing
    assert probation.verdict(130.0)[0] == "watching"
    assert probation.verdict(160.0)[0] == "passed"


@pytest.mark.parametrize("kind", ["inference_error", "inference_overrun", "drive_stall"])
def test_probation_rolls_back_on_a_model_fault(kind: str) -> None:
    probation = Probation({"name": "v2"}, 100.0, ProbationLimits(window_s=60))
    probation.observe(fault(kind, 99.0))  # before the promotion: the previous model's
    assert probation.verdict(101.0)[0] == "watching"
    probation.observe(fault(kind, 105.0))
    verdict, why = probation.verdict(106.0)
    assert verdict == "rollback" and "within 6 s of promotion" in why


def test_probation_limits_allow_some_faults_when_configured() -> None:
    probation = Probation({"name": "v2"}, 0.0, ProbationLimits(window_s=10, max_inference_overruns=2))
    for at in (1.0, 2.0):
        probation.observe(fault("inference_overrun", at))
    assert probation.verdict(3.0)[0] == "watching"
    probation.observe(fault("inference_overrun", 4.0))
    assert probation.verdict(4.0)[0] == "rollback"

