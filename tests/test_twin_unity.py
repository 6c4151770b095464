"""Raw-socket transcripts of what real Donkey simulator clients send, answered as Unity answers them.

Written from the Unity simulator's code (sdsandbox ``CameraSensor.SetConfig``,
``TcpCarHandler``) and gym-donkeycar's client (``donkey_sim.py``), as described in
shared/reference/donkey-sim-protocol.md: each ``cam_config`` field applied on its own (gym
sends ``img_enc: "0"`` when the user leaves the encoding out, and its deprecated top-level
fields as a ``cam_config`` of zeros), Unity-style negative offsets, the greeting a frame
after the connection, a start-line message on every crossing (gym's lap counter), and every
scene name gym-donkeycar has an environment id for.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from simulator.scenes import SCENES
from tests.test_protocol import LOGGER, Message, RawClient, RunningTwin, decode_image, is_grey_frame, running_twins


@pytest.fixture
def twin(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., RunningTwin]]:
    """Twins in background threads (see tests/test_protocol.py); none may log an error."""
    yield from running_twins(caplog)


def gym_cam_config(msg_type: str = "cam_config", **fields: Any) -> Message:
    """gym-donkeycar's ``send_cam_config``: every field sent, as a string, 0 meaning "keep"."""
    defaults: dict[str, Any] = {"img_w": 0, "img_h": 0, "img_d": 0, "img_enc": 0, "fov": 0, "fish_eye_x": 0.0,
                                "fish_eye_y": 0.0, "offset_x": 0.0, "offset_y": 0.0, "offset_z": 0.0,
                                "rot_x": 0.0, "rot_y": 0.0, "rot_z": 0.0}
    return {"msg_type": msg_type, **{key: str(value) for key, value in {**defaults, **fields}.items()}}


def warnings_for(caplog: pytest.LogCaptureFixture, peer: str, kind: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.WARNING and r.getMessage().startswith(f"peer {peer}: {kind}")]


def frame_with(client: RawClient, check: Callable[[Any], bool]) -> Any:
    """The image of the first telemetry frame whose decoded image passes ``check``."""
    found: list[Any] = []

    def matches(message: Message) -> bool:
        if message.get("msg_type") != "telemetry":
            return False
        image = decode_image(message["image"])
        if check(image):
            found.append(image)
            return True
        return False

    client.wait_for(matches)
    return found[0]


# -- cam_config: each field on its own ------------------------------------------------------------
@pytest.mark.parametrize(("width", "height", "depth"), [(96, 72, 3), (256, 256, 3), (64, 48, 1)])
def test_gym_default_cam_config_with_img_enc_zero_gets_the_size_asked_for(
    twin: Callable[..., RunningTwin], caplog: pytest.LogCaptureFixture, width: int, height: int, depth: int
) -> None:
    """gym's default config (img_enc "0"), and its deprecated top-level img_w/img_h/img_d, which it sends
    the same way: the size and depth apply, the encoding stays JPG, nothing is reported."""
    server = twin(track="generated_track")
    client = server.connect_with_car()
    client.send(gym_cam_config(img_w=width, img_h=height, img_d=depth))

    image = frame_with(client, lambda image: image.size == (width, height))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert is_grey_frame(np.asarray(image)) == (depth == 1)
    for later in [m for m in client.collect(0.3) if m["msg_type"] == "telemetry"]:
        assert decode_image(later["image"]).size == (width, height)
    assert warnings_for(caplog, client.peer_name) == []


def test_unity_style_negative_offset_moves_the_camera_down(
    twin: Callable[..., RunningTwin], caplog: pytest.LogCaptureFixture
) -> None:
    server = twin(track="generated_track")
    client = server.connect_with_car()
    default = frame_with(client, lambda image: True)
    sky = np.asarray(default)[:10].mean()  # the top rows of the default camera see sky

    # Unity sets the whole localPosition: (0, -0.2, 0) is a lens 5 cm above the ground, at mid-wheelbase.
    client.send(gym_cam_config(offset_y=-0.2, rot_x=10))
    low = frame_with(client, lambda image: np.abs(np.asarray(image, dtype=int) - np.asarray(default)).mean() > 5)
    assert low.size == (160, 120)
    assert warnings_for(caplog, client.peer_name) == []

    # Under the ground: lifted to just above it, with a warning, and the rotation still applies.
    client.send(gym_cam_config(offset_y=-5, rot_x=90))
    frame_with(client, lambda image: np.asarray(image)[:10].mean() < sky - 30)  # looking down: no sky
    assert len(warnings_for(caplog, client.peer_name, "ignored cam_config.offset_y")) == 1


def test_an_invalid_field_costs_only_itself_and_is_logged_once(
    twin: Callable[..., RunningTwin], caplog: pytest.LogCaptureFixture
) -> None:
    server = twin(track="generated_track")
    client = server.connect_with_car()
    bad = gym_cam_config(img_w=128, img_h=96, img_d=2, img_enc="BMP", fov="wide", offset_x="left")
    for _ in range(2):
        client.send(bad)
    image = frame_with(client, lambda image: image.size == (128, 96))
    assert image.format == "JPEG" and not is_grey_frame(np.asarray(image))
    client.send({"msg_type": "cam_config", "img_w": "128", "img_h": "0", "img_enc": "png"})  # one side only
    frame_with(client, lambda image: image.format == "PNG" and image.size == (128, 96))
    client.send({"msg_type": "get_protocol_version"})  # everything before it has been handled
    client.wait_for("protocol_version")
    peer = client.peer_name
    for field in ("img_d", "img_enc", "fov", "offset_x", "img_w/img_h"):
        assert len(warnings_for(caplog, peer, f"ignored cam_config.{field}:")) == 1, field
    assert len(warnings_for(caplog, peer)) == 5


def test_a_camera_over_the_pixel_budget_is_scaled_down_with_a_warning(
    twin: Callable[..., RunningTwin], caplog: pytest.LogCaptureFixture
) -> None:
    server = twin(track="generated_track", max_camera_pixels=320 * 240)
    client = server.connect_with_car()
    client.send(gym_cam_config(img_w=1920, img_h=1080, img_enc="PNG"))
    image = frame_with(client, lambda image: image.format == "PNG")
    assert image.size == (369, 207)  # the aspect kept, within 320 x 240 pixels
    (warning,) = warnings_for(caplog, client.peer_name, "ignored cam_config.camera size")
    assert "1920x1080" in warning and "369x207" in warning
    summary = server.server.summary()["cars"][0]
    assert summary["camera"] == "369x207 PNG"


def test_camera_b_is_configured_by_field_and_sent_under_both_names(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track")
    client = server.connect_with_car()
    client.send(gym_cam_config("cam_config_b", img_w=80, img_h=60, img_enc=0))
    message, _ = client.wait_for(lambda m: m.get("msg_type") == "telemetry" and "image_b" in m)
    assert message["image_b"] == message["imageb"]
    assert decode_image(message["image_b"]).size == (80, 60)
    assert decode_image(message["image"]).size == (160, 120)


def test_car_config_and_racer_info_apply_field_by_field(
    twin: Callable[..., RunningTwin], caplog: pytest.LogCaptureFixture
) -> None:
    server = twin(track="generated_track")
    client = server.connect_with_car()
    client.send({"msg_type": "car_config", "body_style": "tank", "body_r": "300", "body_g": "10", "body_b": "x",
                 "car_name": "me", "font_size": "100"})
    client.send({"msg_type": "racer_info", "racer_name": "Ann", "car_name": "me", "bio": "hi", "country": "FR",
                 "guid": "1"})
    client.send({"msg_type": "get_protocol_version"})
    client.wait_for("protocol_version")
    car = server.server.summary()["cars"][0]
    assert car["car_name"] == "me" and car["racer_name"] == "Ann" and car["body_style"] == "donkey"
    peer = client.peer_name
    for field in ("body_style", "body_r", "body_b"):
        assert len(warnings_for(caplog, peer, f"ignored car_config.{field}:")) == 1, field


# -- the greeting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("track", [None, "generated_track"])
def test_the_greeting_arrives_no_sooner_than_the_configured_delay(
    twin: Callable[..., RunningTwin], track: str | None
) -> None:
    for delay in (0.05, 0.25):
        server = twin(track=track, greeting_delay=delay)
        for _ in range(3):
            started = time.monotonic()
            client = server.connect()
            first = client.read_message()
            waited = time.monotonic() - started
            assert first["msg_type"] == ("car_loaded" if track else "scene_selection_ready")
            assert delay <= waited < delay + 3.0, f"first message after {waited * 1000:.1f} ms (delay {delay} s)"
            client.close()


# -- laps -----------------------------------------------------------------------------------------
class GymLapCounter:
    """gym-donkeycar's ``on_collision_with_starting_line``: the first crossing starts the clock."""

    def __init__(self) -> None:
        self.current_lap_time = 0.0
        self.starting_line_index = -1
        self.lap_count = 0
        self.lap_times: list[float] = []

    def on_collision_with_starting_line(self, message: Message) -> None:
        if self.current_lap_time == 0.0:
            self.current_lap_time = message["timeStamp"]
            self.starting_line_index = message["starting_line_index"]
        elif self.starting_line_index == message["starting_line_index"]:
            self.lap_times.append(float(message["timeStamp"] - self.current_lap_time))
            self.current_lap_time = message["timeStamp"]
            self.lap_count += 1


def test_three_laps_give_three_lap_messages_plus_the_first_crossing(twin: Callable[..., RunningTwin]) -> None:
    server = twin(track="generated_track", time_scale=4.0)
    client = server.connect_with_car()
    client.send({"msg_type": "car_config", "body_style": "donkey", "body_r": "1", "body_g": "2", "body_b": "3",
                 "car_name": "lapper", "font_size": "100"})
    start, _ = client.wait_for("telemetry")
    yaw = math.radians(start["yaw"])
    behind = {"msg_type": "set_position", "pos_x": str(start["pos_x"] - 0.4 * math.sin(yaw)), "pos_y": "0",
              "pos_z": str(start["pos_z"] - 0.4 * math.cos(yaw)), "Qx": "0", "Qy": str(math.sin(yaw / 2)),
              "Qz": "0", "Qw": str(math.cos(yaw / 2))}
    counter = GymLapCounter()
    crossings: list[Message] = []
    client.send({"msg_type": "control", "steering": "0", "throttle": "0.3", "brake": "0"})
    for _ in range(4):  # a teleport behind the line never counts; driving over it does, each time
        client.send(behind)
        crossing, skipped = client.wait_for("collision_with_starting_line", skip=("telemetry",))
        crossings.append(crossing)
        counter.on_collision_with_starting_line(crossing)
        assert all(m["time"] <= crossing["timeStamp"] + 0.3 for m in skipped)
    assert crossings[0]["lap_time"] == 0.0  # the first crossing completes no lap
    assert all(set(m) >= {"starting_line_index", "timeStamp", "lap_time"} for m in crossings)
    assert all(isinstance(m["starting_line_index"], int) and m["starting_line_index"] == 0 for m in crossings)
    assert crossings[0]["timeStamp"] > 0.0  # gym takes 0.0 for "no crossing yet"
    assert counter.lap_count == 3
    for message, lap in zip(crossings[1:], counter.lap_times, strict=True):
        assert message["lap_time"] == pytest.approx(lap)
    car = server.server.summary()["cars"][0]
    assert car["laps"] == counter.lap_count and car["line_crossings"] == 4 and car["car_name"] == "lapper"
    assert car["lap_times"] == pytest.approx(counter.lap_times, abs=0.001)


# -- scenes ---------------------------------------------------------------------------------------
def test_every_scene_name_loads_and_the_summary_says_which_geometry_served_it(
    twin: Callable[..., RunningTwin], caplog: pytest.LogCaptureFixture
) -> None:
    server = twin(track=None, load_interval=0.0)
    client = server.connect()
    assert client.read_message()["msg_type"] == "scene_selection_ready"
    client.send({"msg_type": "get_scene_names"})
    names = client.wait_for("scene_names")[0]["scene_names"]
    assert names == [scene.name for scene in SCENES]
    assert len(names) == 11 and "circuit_launch" in names and "roboracingleague_1" in names
    nodes: dict[str, int] = {}
    for name in [*names, "generated_road"]:
        client.send({"msg_type": "load_scene", "scene_name": name})
        client.wait_for("car_loaded")
        telemetry, _ = client.wait_for("telemetry")
        assert telemetry["hit"] == "none" and decode_image(telemetry["image"]).size == (160, 120)
        nodes[name] = nodes.get(name, 0) or telemetry["totalNodes"]
        if name == "generated_road" and len(server.server.cars) == len(names) + 1:
            assert telemetry["totalNodes"] != nodes[name], "a second generated_road load gave the same road"
        client.send({"msg_type": "exit_scene"})
        client.wait_for("scene_selection_ready")
    cars = server.server.summary()["cars"]
    served = {car["track"]: car["geometry"] for car in cars}
    assert served == {scene.name: scene.geometry for scene in SCENES}
    seeds = [car["road_seed"] for car in cars if car["track"] == "generated_road"]
    assert len(set(seeds)) == 2
    assert nodes["warehouse"] != nodes["generated_track"] != nodes["mountain_track"]
    for scene in SCENES:
        notes = warnings_for(caplog, client.peer_name, f"scene {scene.name}:")
        if scene.substituted:
            assert len(notes) == 1 and repr(scene.geometry) in notes[0]
        else:
            assert notes == []
