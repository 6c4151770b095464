"""The phase lock and the locked pacer with synthetic frame timestamps and a fake clock: no threads, no sleeps."""

from __future__ import annotations

import random

import pytest

from agent.core.phaselock import PhaseLock

PERIOD = 0.05


def feed(lock: PhaseLock, times: list[float], first_seq: int = 1) -> None:
    for i, t in enumerate(times):
        lock.observe(first_seq + i, t)


def camera(n: int, period: float = PERIOD, start: float = 100.0, jitter: float = 0.0, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [start + i * period + rng.uniform(-jitter, jitter) for i in range(n)]


def test_locks_from_cold_and_predicts_the_next_frame() -> None:
    lock = PhaseLock(PERIOD)
    feed(lock, camera(3))
    assert not lock.locked  # a few frames are not a lock yet
    feed(lock, camera(20)[3:], first_seq=4)
    assert lock.locked
    seq, due = lock.next_frame(100.0 + 19 * PERIOD + 0.001)
    assert seq == 21 and due == pytest.approx(100.0 + 20 * PERIOD, abs=1e-6)


@pytest.mark.parametrize("rate_error", [-0.01, 0.01])
def test_tracks_a_camera_that_drifts_by_one_percent(rate_error: float) -> None:
    true_period = PERIOD * (1 + rate_error)  # 19.8 or 20.2 Hz against a nominal 20
    lock = PhaseLock(PERIOD)
    times = camera(600, true_period)
    feed(lock, times)
    assert lock.period == pytest.approx(true_period, rel=1e-3)
    _, due = lock.next_frame(times[-1] + 0.001)
    assert due == pytest.approx(times[-1] + true_period, abs=0.0002)  # a fifth of a millisecond
    assert lock.status().outliers == 0 and lock.status().relocks == 0


def test_filters_jitter_and_sizes_the_guard_to_it() -> None:
    lock = PhaseLock(PERIOD)
    times = camera(400, jitter=0.005)  # +-5 ms, uniform: a simulator under load
    feed(lock, times)
    _, due = lock.next_frame(times[-1] + 0.001)
    ideal = 100.0 + 400 * PERIOD
    assert due == pytest.approx(ideal, abs=0.0015)  # the prediction is far steadier than any one frame
    assert 0.003 < lock.guard() <= 0.0055  # the guard covers the jitter, and no more
    quiet = PhaseLock(PERIOD)
    feed(quiet, camera(400, jitter=0.0002))
    assert quiet.guard() < 0.0005


def test_a_dropped_frame_keeps_the_schedule_and_is_counted() -> None:
    lock = PhaseLock(PERIOD)
    times = camera(60)
    feed(lock, times[:30])
    lock.observe(32, times[31])  # frame 31 never came
    feed(lock, times[32:], first_seq=33)
    status = lock.status()
    assert status.dropped_frames == 1 and status.relocks == 0 and status.locked
    _, due = lock.next_frame(times[-1] + 0.001)
    assert due == pytest.approx(times[-1] + PERIOD, abs=1e-6)


def test_a_gap_relocks_on_the_new_phase() -> None:
    lock = PhaseLock(PERIOD)
    feed(lock, camera(40))
    restart = 100.0 + 40 * PERIOD + 1.0137  # the camera stopped for a second and came back on another phase
    feed(lock, camera(30, start=restart), first_seq=41)
    assert lock.locked and lock.status().relocks == 1
    _, due = lock.next_frame(restart + 29 * PERIOD + 0.001)
    assert due == pytest.approx(restart + 30 * PERIOD, abs=1e-4)


def test_a_few_outliers_do_not_move_the_lock() -> None:
    lock = PhaseLock(PERIOD)
    times = camera(100)
    times[50] += 0.03  # one frame 30 ms late (a hiccup upstream)
    feed(lock, times)
    assert lock.status().outliers == 1 and lock.status().relocks == 0
    _, due = lock.next_frame(times[-1] + 0.001)
    assert due == pytest.approx(times[-1] + PERIOD, abs=1e-5)


def test_a_camera_that_stops_is_not_predicted_forever_by_the_lock_alone() -> None:
    """The lock keeps predicting (it has no clock); it is the drive loop's stale-frame fault that acts."""
    lock = PhaseLock(PERIOD)
    feed(lock, camera(40))
    seq, due = lock.next_frame(100.0 + 40 * PERIOD + 10.0)  # ten seconds later
    assert seq == 40 + 201 and due > 100.0 + 40 * PERIOD + 10.0


# -- the locked pacer and its adaptive delay, on a fake clock with a synthetic camera ------------------------
import numpy as np  # noqa: E402

from agent.config import DriveConfig  # noqa: E402
from agent.core.pacing import AdaptiveDelay, LockedPacer  # noqa: E402
from agent.hw.interfaces import Frame  # noqa: E402


class FakeCamera:
    """Frames due at ``times`` (None: dropped); ``read`` moves the fake clock to an arrival or the timeout."""

    def __init__(self, times: list[float | None], arrival_delay: dict[int, float] | None = None) -> None:
        self.times = times
        self.arrivals = [None if t is None else t + (arrival_delay or {}).get(i + 1, 0.0) for i, t in enumerate(times)]
        self.now = times[0] - 0.01 if times[0] is not None else 0.0
        self.image = np.zeros((120, 160, 3), np.uint8)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def read(self, after_seq: int, timeout: float) -> tuple[Frame | None, str]:
        deadline = self.now + max(0.0, timeout)
        for index, due in enumerate(self.arrivals):
            seq = index + 1
            if seq > after_seq and due is not None and due <= deadline:
                self.now = max(self.now, due)
                newest = max(i + 1 for i, t in enumerate(self.arrivals) if t is not None and t <= self.now)
                return Frame(newest, self.times[newest - 1], self.image), ""  # type: ignore[arg-type]
        self.now = deadline
        return None, ""


def run_pacer(times: list[float | None], cycles: int, compute: float = 0.002,
              arrival_delay: dict[int, float] | None = None) -> tuple[LockedPacer, list[tuple]]:
    """Drive a LockedPacer as the drive loop does; every write is recorded: (frame seq or None, arrival, written).

    ``arrival_delay`` hands some frames to the loop late (a reader thread not scheduled in time) while their
    timestamps stay where the camera took them."""
    camera = FakeCamera(times, arrival_delay or {})
    pacer = LockedPacer(DriveConfig(pacing="locked"), camera.read, lambda t: None, camera.clock, 0.15, camera.sleep)
    first, _ = camera.read(0, 1.0)
    assert first is not None
    pacer.start(first)
    last_seq, frame_time, last_cycle, outputs = first.seq, first.timestamp, camera.now, []
    for _ in range(cycles):
        wake = pacer.wait(last_seq, frame_time, last_cycle)
        last_cycle = arrival = camera.now
        if wake.frame is not None and wake.frame.seq > last_seq:
            camera.now += compute
            pacer.computed(compute)
            outputs.append((wake.frame.seq, arrival, max(wake.output_at, camera.now)))
            last_seq, frame_time = wake.frame.seq, wake.frame.timestamp
        else:  # no new frame: the loop writes its last decision again, at the slot
            outputs.append((None, arrival, max(wake.output_at, camera.now)))
        camera.now = outputs[-1][2]
    return pacer, outputs


def test_locked_pacer_writes_on_a_smooth_phase_through_jitter() -> None:
    rng = random.Random(3)
    times: list[float | None] = [10.0 + i * PERIOD + rng.uniform(-0.005, 0.005) for i in range(600)]
    pacer, outputs = run_pacer(times, 590)
    steady = outputs[100:]
    intervals = np.diff([w for _, _, w in steady])
    assert np.abs(intervals - PERIOD).max() < 0.0005  # +-5 ms of jitter in, under 0.5 ms out
    status = pacer.status()
    assert status["locked"] and status["late_outputs"] == 0
    assert sum(seq is None for seq, _, _ in steady) <= 10  # the guard is a p99: about 1 % of slots held
    offset = status["output_offset_ms"] / 1000
    assert 0.005 < offset < 0.0095  # the jitter guard (~5 ms) + compute (2 ms) + margin


def test_locked_pacer_on_a_quiet_camera_has_low_latency() -> None:
    times: list[float | None] = [10.0 + i * PERIOD for i in range(300)]
    pacer, outputs = run_pacer(times, 290)
    latencies = [w - a for _, a, w in outputs[80:]]  # once the guard is measured (about 40 frames after lock)
    assert all(seq is not None for seq, _, _ in outputs)  # every write on a new frame
    assert max(latencies) < 0.0035  # compute (2 ms) + margin (0.5 ms) + a near-zero guard
    assert pacer.status()["compute_high_ms"] == pytest.approx(2.0)


def test_locked_pacer_holds_its_schedule_through_a_dropped_frame_and_relocks_after_a_gap() -> None:
    times: list[float | None] = [10.0 + i * PERIOD for i in range(400)]
    times[150] = None  # dropped
    for i in range(250, 270):  # the camera stops for a second...
        times[i] = None
    for i in range(270, 400):  # ...and comes back on another phase
        times[i] = 10.0 + i * PERIOD + 0.0213
    pacer, outputs = run_pacer(times, 380)
    status = pacer.status()
    assert status["frames_dropped_by_camera"] == 1 and status["relocks"] == 1 and status["locked"]
    fresh = [(s, w) for s, _, w in outputs if s is not None]
    around_drop = [w for s, w in fresh if 145 <= s <= 156]
    gaps = np.round(np.diff(around_drop) / PERIOD, 3)
    assert sorted(set(gaps.tolist())) == [1.0, 2.0]  # on the grid: the missing frame's slot held, not moved
    held = [w for s, _, w in outputs if s is None and around_drop[0] < w < around_drop[-1]]
    assert len(held) == 1 and min(abs(held[0] - w) for w in around_drop) == pytest.approx(PERIOD, abs=1e-9)
    after = [w for s, w in fresh if s > 300]
    assert np.abs(np.diff(after) - PERIOD).max() < 0.0002  # locked again on the new phase


def test_adaptive_delay_converges_and_respects_its_bounds() -> None:
    delay = AdaptiveDelay(margin=0.0005, maximum=0.010, update_every=10)
    assert delay.current(0.001) == 0.010  # unmeasured: the most the configuration allows
    for _ in range(200):
        delay.observe(0.002)
    assert delay.current(0.001) == pytest.approx(0.0035)  # guard + p99 + margin, set at once the first time
    for _ in range(400):
        delay.observe(0.050)  # the model got slow
    moved = [delay.current(0.001) for _ in range(300)]
    assert max(np.diff(moved)) <= 0.00005 + 1e-12  # never more than the slew per cycle
    assert moved[-1] == 0.010  # and never past the configured maximum


def test_a_frame_handed_over_late_does_not_move_the_output() -> None:
    """The camera keeps its clock, but the loop gets some frames late (its reader thread was not scheduled):
    the slots go out on time regardless; a late frame is used at the next slot or superseded, never written
    late."""
    times: list[float | None] = [10.0 + i * PERIOD for i in range(400)]
    rng = random.Random(5)
    late = {seq: rng.uniform(0.006, 0.030) for seq in rng.sample(range(120, 390), 12)}
    pacer, outputs = run_pacer(times, 390, arrival_delay=late)
    writes = [w for _, _, w in outputs[80:]]
    # every write on the grid through every late frame, but for the offset's own slew (0.05 ms a cycle at most)
    # as the guard learns how late frames come
    assert np.abs(np.diff(writes) - PERIOD).max() <= 0.00005 + 1e-9
    status = pacer.status()
    assert status["late_outputs"] == 0 and status["relocks"] == 0
    assert 1 <= status["late_frames"] + status["held_outputs"] <= 2 * len(late)
    used = [seq for seq, _, _ in outputs if seq is not None]
    assert used == sorted(set(used))  # no frame decided twice, none out of order


def test_a_camera_that_stops_keeps_the_slots_until_the_frame_is_stale() -> None:
    times: list[float | None] = [10.0 + i * PERIOD for i in range(200)]
    for i in range(100, 200):
        times[i] = None
    _, outputs = run_pacer(times, 130)
    last_fresh = max(w for s, _, w in outputs if s is not None)
    held = [w for s, _, w in outputs if s is None]
    assert held and np.abs(np.diff(held[:2]) - PERIOD).max() < 1e-6  # the schedule holds through the gap
    assert held[1] - last_fresh == pytest.approx(2 * PERIOD, abs=1e-6)
    # the loop is awake within a millisecond of the frame turning stale (150 ms), to see its fault
    stale = times[99] + 0.150  # type: ignore[operator]
    assert any(stale < a <= stale + 0.001 + 1e-9 for s, a, _ in outputs if s is None)
    assert np.diff([a for _, a, _ in outputs[-20:]]).min() > 0.4 * PERIOD  # and never spins
