"""Tracks, physics, renderer, lap counting and off-track detection of the in-process twin."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulator import physics
from simulator.expert import ExpertPilot
from simulator.physics import CarLimits
from simulator.render import PALETTE, CameraConfig, Randomization
from simulator.track import get_track, track_names
from simulator.world import TwinCar


@pytest.mark.parametrize("name", track_names())
def test_tracks_are_drivable_closed_loops(name: str) -> None:
    track = get_track(name)
    limits = CarLimits()
    min_turn_radius = limits.wheelbase / math.tan(limits.max_steer)
    assert 1 / np.abs(track.curvature()).max() > 1.5 * min_turn_radius
    assert track.min_clearance() > track.width + 0.5  # the road never overlaps itself
    assert np.hypot(*(track.points[0] - track.points[-1])) < 2 * track.spacing  # closed
    total_turn = track.curvature().sum() * track.spacing
    assert abs(abs(total_turn) - 2 * math.pi) < 0.01


def test_default_track_lap_length_suits_a_demo() -> None:
    track = get_track("generated_track")
    assert 20 <= track.length / 1.5 <= 40  # seconds per lap at the 1.5 m/s demo speed


def test_unknown_track_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="generated_track"):
        get_track("no_such_track")


def test_projection_sign_and_progress() -> None:
    track = get_track("generated_track")
    x, z, heading = track.point_at(5.0)
    right = track.project(x + 0.3 * math.cos(heading), z - 0.3 * math.sin(heading))
    left = track.project(x - 0.3 * math.cos(heading), z + 0.3 * math.sin(heading))
    assert right.cte == pytest.approx(0.3, abs=0.01)
    assert left.cte == pytest.approx(-0.3, abs=0.01)
    assert right.progress == pytest.approx(5.0, abs=0.02)


def drive(car: TwinCar, steering: float, throttle: float, seconds: float, dt: float = 0.05) -> None:
    car.set_controls(steering, throttle)
    for _ in range(round(seconds / dt)):
        car.advance(dt)


def test_physics_limits_of_a_small_car() -> None:
    limits = CarLimits()
    state = physics.CarState()
    physics.step(state, 0.0, 1.0, 0.0, 5.0, limits=limits)
    assert state.speed == pytest.approx(limits.top_speed, rel=0.01)
    grass = physics.CarState(speed=2.0)
    road = physics.CarState(speed=2.0)
    physics.step(grass, 0.0, 0.3, 0.0, 1.0, limits=limits, offroad=True)
    physics.step(road, 0.0, 0.3, 0.0, 1.0, limits=limits)
    assert grass.speed < road.speed
    physics.step(state, 0.0, 0.0, 1.0, 2.0, limits=limits)
    assert state.speed == pytest.approx(0.0, abs=1e-6)
    physics.step(state, 0.0, -1.0, 0.0, 5.0, limits=limits)
    assert state.speed == pytest.approx(-limits.reverse_speed, rel=0.01)
    # Full right lock at a walking pace turns on the kinematic radius, clockwise (yaw grows).
    car = TwinCar("generated_track")
    drive(car, 1.0, 0.15, 3.0)
    radius = car.state.speed / car.state.yaw_rate
    assert radius == pytest.approx(0.26 / math.tan(math.radians(25)), rel=0.05)
    # Too fast for the grip: lateral acceleration is capped, the car runs wide.
    car = TwinCar("generated_track")
    drive(car, 1.0, 1.0, 3.0)
    assert abs(car.state.speed * car.state.yaw_rate) <= CarLimits().max_lateral_accel + 1e-6


def test_same_seed_same_controls_same_frames() -> None:
    randomization = Randomization(lighting=0.2, texture=0.5, noise=4.0)
    runs = []
    for _ in range(2):
        car = TwinCar("mountain_track", seed=7, randomization=randomization)
        frames = []
        for i in range(30):
            car.set_controls(math.sin(i / 5), 0.3)
            car.advance(0.05)
            frames.append(car.render())
        runs.append((car.state, np.stack(frames)))
    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1])
    other = TwinCar("mountain_track", seed=8, randomization=randomization)
    assert not np.array_equal(other.render(), runs[0][1][0])


def test_frame_shows_road_below_and_sky_above() -> None:
    car = TwinCar("generated_track")
    frame = car.render()
    assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
    sky = frame[:10].reshape(-1, 3).mean(axis=0)
    assert sky[2] > sky[1] > sky[0]  # blue
    road = frame[100:, 20:60].reshape(-1, 3).mean(axis=0)  # left of the centre line
    assert np.abs(road - PALETTE[1]).max() < 15
    # The dashed yellow centre line is ahead of a car sitting on the centreline.
    yellow = (frame[..., 0] > 180) & (frame[..., 1] > 150) & (frame[..., 2] < 100)
    assert yellow[60:, 60:100].sum() > 20
    # Off the road, facing away from the track, the camera sees grass.
    car.set_pose(car.state.x + 4 * math.cos(car.state.yaw), car.state.z - 4 * math.sin(car.state.yaw),
                 car.state.yaw + math.pi / 2)
    grass = car.render()[90:].reshape(-1, 3).mean(axis=0)
    assert grass[1] > grass[0] and grass[1] > grass[2]


def test_camera_config_size_and_grayscale() -> None:
    car = TwinCar("generated_track")
    frame = car.render(CameraConfig(width=320, height=240, grayscale=True))
    assert frame.shape == (240, 320, 3)
    assert np.array_equal(frame[..., 0], frame[..., 1]) and np.array_equal(frame[..., 1], frame[..., 2])


def test_off_track_is_detected_counted_and_reported_as_hit() -> None:
    car = TwinCar("generated_track")
    assert car.telemetry()["hit"] == "none"
    drive(car, -0.5, 0.3, 1.5)  # veer left into the grass and keep going
    drive(car, 0.0, 0.3, 2.0)
    assert car.off_track
    assert car.stats.off_track_events == 1
    assert car.telemetry()["hit"] != "none"
    assert car.stats.max_abs_cte > car.track.half_width
    car.reset()
    assert not car.off_track or abs(car.cte) > car.track.half_width
    drive(car, 0.0, 0.0, 0.2)
    assert car.telemetry()["hit"] == "none"


def test_every_start_line_crossing_is_reported_and_laps_are_timed_between_crossings() -> None:
    """As Unity's start-line trigger: each forward crossing once, the first one starting the lap clock."""
    car = TwinCar("generated_track")
    start = (car.state.x, car.state.z, car.state.yaw)

    def behind_the_line() -> None:
        car.set_pose(start[0] - 0.5 * math.sin(start[2]), start[1] - 0.5 * math.cos(start[2]), start[2])

    behind_the_line()  # a teleport never crosses the line itself
    assert car.take_crossings() == []
    laps = 0
    car.set_controls(0.0, 0.3)
    for _ in range(40):
        laps += car.advance(0.05)
    (first,) = car.take_crossings()
    assert first.lap_time is None and first.time > 0  # the first crossing: timing starts, no lap yet
    assert laps == 0 and car.stats.laps == 0 and car.stats.line_crossings == 1
    behind_the_line()
    for _ in range(40):
        laps += car.advance(0.05)
    (second,) = car.take_crossings()
    assert laps == 1 and car.stats.laps == 1 and car.stats.line_crossings == 2
    assert second.lap_time == pytest.approx(second.time - first.time)
    assert car.stats.lap_times == [second.lap_time]
    # Reverse back over the line and forward again: no new crossing.
    car.set_controls(0.0, -1.0)
    for _ in range(200):
        laps += car.advance(0.05)
        if car.track.length / 2 < car.progress < car.track.length - 0.5:
            break
    assert car.track.length / 2 < car.progress  # behind the line now
    car.set_controls(0.0, 0.3)
    for _ in range(200):
        laps += car.advance(0.05)
        if 0.5 < car.progress < car.track.length / 2:
            break
    assert 0.5 < car.progress < car.track.length / 2  # back across it
    assert car.take_crossings() == [] and laps == 1 and car.stats.laps == 1


def test_a_fresh_car_crosses_the_line_as_it_starts_and_completes_a_lap_a_track_length_later() -> None:
    car = TwinCar("generated_track")
    car.set_controls(0.0, 0.25)
    car.advance(0.05)
    (first,) = car.take_crossings()
    assert first.lap_time is None and first.time == pytest.approx(0.05)
    expert = ExpertPilot(car.track)
    while car.stats.laps == 0 and car.time < 120:
        command = expert.command(car.state.x, car.state.z, car.state.yaw, car.state.speed, 0.05)
        car.set_controls(command.steering, command.throttle)
        car.advance(0.05)
    assert car.stats.laps == 1 and car.stats.distance == pytest.approx(car.track.length, abs=0.5)


def test_telemetry_fields_and_units() -> None:
    car = TwinCar("generated_track")
    drive(car, 0.2, 0.4, 1.0)
    t = car.telemetry()
    for key in ("steering_angle", "throttle", "speed", "hit", "time", "pos_x", "pos_y", "pos_z", "vel_x", "vel_y",
                "vel_z", "cte", "activeNode", "totalNodes", "gyro_x", "gyro_y", "gyro_z", "accel_x", "accel_y",
                "accel_z", "pitch", "yaw", "roll"):
        assert key in t
    assert t["speed"] == pytest.approx(math.hypot(t["vel_x"], t["vel_z"]))
    assert t["steering_angle"] == 0.2 and t["throttle"] == 0.4
    assert t["time"] == pytest.approx(1.0)
    assert 0 <= t["yaw"] < 360 and t["totalNodes"] == car.track.node_count
