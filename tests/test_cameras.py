"""Camera backends that run here: tub replay (frames from a recorded tub) and the frame slot."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from agent.config import DriveConfig, RealtimeConfig
from agent.core.drive import DriveCore, DriveParts
from agent.hw.cameras import FrameSlot, TubReplayCamera
from agent.pilot import Autopilot
from agent.tub import TubWriter
from simulator.record import record_in_process
from tests.fakes.parts import TwinRig

SHIPPED = Path(__file__).parent.parent / "models" / "pilot.tflite"


def test_tub_replay_delivers_the_recorded_frames_in_order(tmp_path: Path) -> None:
    with TubWriter(tmp_path / "tub") as writer:
        for i in range(6):
            writer.write({"cam/image_array": np.full((120, 160, 3), 40 * i, np.uint8), "user/angle": 0.0,
                          "user/throttle": 0.0, "user/mode": "user"})
    camera = TubReplayCamera(tmp_path / "tub", fps=50, loop=False)
    seen, seq = [], 0
    while (frame := camera.read(seq, 1.0)) is not None:
        seen.append(int(frame.image.mean().round()))
        assert frame.seq == seq + 1  # no frame skipped at this rate
        seq = frame.seq
    camera.close()
    assert seen == [0, 40, 80, 120, 160, 200]


def test_the_drive_core_runs_on_replayed_expert_frames(tmp_path: Path) -> None:
    """Replay: the shipped model sees the expert's frames and steers like the expert did."""
    record_in_process(tmp_path / "tub", track="mountain_track", laps=1, max_sim_seconds=6.0)
    camera = TubReplayCamera(tmp_path / "tub", fps=20)
    rig = TwinRig()  # only its actuator side is used: the writes are recorded
    try:
        core = DriveCore(DriveConfig(realtime=RealtimeConfig(priority=0, lock_memory=False), max_throttle=0.5),
                         DriveParts(camera, rig, lambda: Autopilot(SHIPPED)))
        core.start()
        assert core.wait_ready(10), core.error
        time.sleep(2.0)
        core.stop()
    finally:
        camera.close()
        rig.close()
    assert core.ok and core.metrics.cycles >= 30
    assert any(abs(s) > 0.05 for _, s, _ in rig.writes)  # it steers on the twisty track


def test_frame_slot_wakes_a_waiting_reader() -> None:
    slot = FrameSlot()
    got = []
    reader = threading.Thread(target=lambda: got.append(slot.read(0, 2.0)))
    reader.start()
    time.sleep(0.05)
    slot.publish_image(np.zeros((2, 2, 3), np.uint8), time.monotonic())
    reader.join(2)
    assert got and got[0] is not None and got[0].seq == 1
    assert slot.read(1, 0.05) is None  # nothing newer
    slot.close()
    assert slot.read(1, 5.0) is None  # closed: returns at once


def test_a_capture_error_never_ends_the_camera_thread(tmp_path: Path) -> None:
    with TubWriter(tmp_path / "tub") as writer:
        for i in range(3):
            writer.write({"cam/image_array": np.full((120, 160, 3), 40 * i, np.uint8), "user/angle": 0.0,
                          "user/throttle": 0.0, "user/mode": "user"})
    broken = sorted((tmp_path / "tub" / "images").iterdir())[1]
    broken.write_bytes(b"not a jpeg")  # a corrupt file on the card
    camera = TubReplayCamera(tmp_path / "tub", fps=50)
    try:
        first = camera.read(0, 2.0)
        assert first is not None
        time.sleep(0.5)  # the second image fails: the thread records it, waits and captures again
        assert camera.errors >= 2 and "UnidentifiedImageError" in str(camera.error)
        assert camera._thread.is_alive()
        again = camera.read(first.seq, 2.0)  # frames keep coming (the first image, each time round)
        assert again is not None and again.seq > first.seq
    finally:
        camera.close()
