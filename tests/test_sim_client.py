"""The agent's simulator link against a hostile simulator on a real socket (tests/hostile_sim.py).

For each misbehaviour: the client never raises out of its API, its reader survives (or, for
a closed connection, the link reconnects as a new car), the bad input is counted, and good
frames and controls flow again afterwards. Waits are generous and timing bounds wide: these
tests run on a loaded two-core machine.
"""

from __future__ import annotations

import base64
import io
import logging
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent.hw.donkeysim.client import (
    BadMessageError,
    SimClient,
    SimDisconnectedError,
    SimError,
    Telemetry,
    decode_image,
    max_image_b64,
    parse_numbers,
)
from agent.hw.interfaces import ActuatorError
from agent.hw.twin import TwinActuators, TwinCamera, TwinLink
from tests.hostile_sim import HostileSim, bomb_png

TIMEOUT = 10.0
CLIENT_LOGGER = "agent.hw.donkeysim.client"


@pytest.fixture
def sim() -> Iterator[HostileSim]:
    with HostileSim() as running:
        yield running


@pytest.fixture
def client(sim: HostileSim) -> Iterator[SimClient]:
    connected = SimClient("127.0.0.1", sim.port, connect_timeout=TIMEOUT).connect()
    yield connected
    connected.close()


def fast_link(sim: HostileSim, **kwargs: Any) -> TwinLink:
    options: dict[str, Any] = {"connect_timeout": TIMEOUT, "backoff_initial": 0.1, "backoff_max": 0.4, **kwargs}
    return TwinLink("127.0.0.1", sim.port, scene="generated_track", **options)


def fresh_frame(sim: HostileSim, wait_next: Callable[[int, float], Telemetry | None], seq: int) -> Telemetry:
    """The first good frame the simulator sends from now on: every byte sent before it has been read."""
    mark = sim.good_frames
    deadline = time.monotonic() + TIMEOUT
    while True:
        telemetry = wait_next(seq, max(0.0, deadline - time.monotonic()))
        assert telemetry is not None, "no good frame after the misbehaviour"
        seq = telemetry.seq
        if telemetry.fields.get("hostile_frame", 0) > mark:
            return telemetry


def control_arrives(sim: HostileSim, send: Callable[[float, float], object], car: int | None = None) -> None:
    """A control sent now is received by the simulator, with its values (on connection ``car``)."""
    since = time.monotonic()
    send(0.25, 0.5)
    assert sim.wait_for(lambda: any(c.steering == 0.25 and c.throttle == 0.5 and c.brake == 0.0
                                    for c in sim.controls_since(since, car)), TIMEOUT), "the control never arrived"


def warnings_for(caplog: pytest.LogCaptureFixture, kind: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == CLIENT_LOGGER and r.levelno == logging.WARNING and f": {kind}: " in r.getMessage()]


# -- the handshake and the happy path -------------------------------------------------------------
def test_handshake_frames_and_controls_cross_the_socket(sim: HostileSim, client: SimClient) -> None:
    telemetry = client.wait_next(0, TIMEOUT)
    assert telemetry is not None and telemetry.image.shape == (120, 160, 3)
    assert all(isinstance(value, float) for value in telemetry.imu)
    connection = sim.connections[0]
    kinds = [m["msg_type"] for m in connection.messages]
    assert kinds[:2] == ["get_scene_names", "load_scene"]
    cam = next(m for m in connection.messages if m["msg_type"] == "cam_config")
    assert (cam["img_w"], cam["img_h"]) == ("160", "120")  # numbers as strings, as Unity wants
    control_arrives(sim, client.send_control)
    client.close()
    assert sim.wait_for(lambda: any(c.brake == 1.0 for c in connection.controls), TIMEOUT), "no brake on close"


def test_handshake_path_b_a_scene_already_loaded() -> None:
    with HostileSim(menu=False) as sim, SimClient("127.0.0.1", sim.port, connect_timeout=TIMEOUT) as client:
        telemetry = client.wait_next(0, TIMEOUT)
        assert telemetry is not None and telemetry.image.shape == (120, 160, 3)
        assert [m["msg_type"] for m in sim.connections[0].messages][:2] == ["car_config", "cam_config"]


# -- each misbehaviour: counted, survived, good frames again ---------------------------------------
COUNTERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "nested": lambda s: s["framing"]["too_deep"],
    "wrong_types": lambda s: min(s["bad_messages"].get(f"bad_field:{k}", 0) for k in ("accel_x", "image", "speed")),
    "no_image": lambda s: s["frames_without_image"],
    "huge": lambda s: s["framing"]["oversized"],
    "cutoff": lambda s: s["framing"]["resyncs"],
    "random": lambda s: s["framing"]["malformed"] + s["framing"]["resyncs"] + s["framing"]["garbage_bytes"],
    "bomb": lambda s: s["bad_messages"].get("image_size", 0),
    "big_image": lambda s: s["bad_messages"].get("image_size", 0),
}
EXPECTED = {"wrong_types": 1, "random": 1}  # per kind of field / at least something; the others: one per tick


@pytest.mark.parametrize("kind", list(COUNTERS))
def test_each_misbehaviour_is_counted_and_survived(
    kind: str, sim: HostileSim, client: SimClient, caplog: pytest.LogCaptureFixture
) -> None:
    first = client.wait_next(0, TIMEOUT)
    assert first is not None
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sim.misbehave(kind, count=3)
    assert sim.wait_idle(TIMEOUT)
    after = fresh_frame(sim, client.wait_next, first.seq)
    assert after.image.shape == (120, 160, 3)
    stats = client.stats()
    assert COUNTERS[kind](stats) >= EXPECTED.get(kind, 3), stats
    assert client.connected and stats["disconnect_reason"] is None
    assert "handler_error" not in stats["bad_messages"]
    if kind == "wrong_types":
        assert stats["frames_without_image"] >= 1  # "image": 42
    if kind in ("bomb", "big_image"):
        # Decoded, the bomb is 1.2 GB (big_image 108 MB) of RGB: the header check refused it first.
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100_000  # KiB
        assert stats["frames_without_image"] >= 3
    for reason in ("bad_field:accel_x", "image_size", "too_deep", "oversized", "resync", "frames_without_image"):
        assert len(warnings_for(caplog, reason)) <= 1, f"{reason} logged more than once"
    control_arrives(sim, client.send_control)


def test_silence_is_waited_out_without_spinning(sim: HostileSim, client: SimClient) -> None:
    first = client.wait_next(0, TIMEOUT)
    assert first is not None
    sim.misbehave("silence", seconds=1.5)
    time.sleep(0.2)  # a frame in flight when the silence began has arrived by now
    latest = client.latest
    assert latest is not None and sim.is_active("silence")
    started = time.monotonic()
    assert client.wait_next(latest.seq, 0.5) is None
    assert time.monotonic() - started >= 0.45
    assert sim.wait_idle(TIMEOUT)
    assert fresh_frame(sim, client.wait_next, latest.seq).seq > latest.seq
    assert client.connected


def test_a_silent_simulator_is_declared_gone_after_the_silence_timeout(sim: HostileSim) -> None:
    client = SimClient("127.0.0.1", sim.port, connect_timeout=TIMEOUT, silence_timeout=0.5).connect()
    try:
        assert client.wait_next(0, TIMEOUT) is not None
        sim.misbehave("silence", seconds=3.0)
        assert client.wait_disconnected(TIMEOUT)
        assert client.disconnect_reason is not None and "no data" in client.disconnect_reason
    finally:
        client.close()


def test_the_reader_survives_a_failing_handler(sim: HostileSim, client: SimClient) -> None:
    first = client.wait_next(0, TIMEOUT)
    assert first is not None
    original = client._on_telemetry
    calls = [0]

    def fail_once(message: dict[str, Any]) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug in a handler")
        original(message)

    client._on_telemetry = fail_once  # type: ignore[method-assign]
    assert fresh_frame(sim, client.wait_next, first.seq).seq > first.seq
    assert client.stats()["bad_messages"]["handler_error"] == 1
    assert client.connected


# -- a closed connection ---------------------------------------------------------------------------
def test_a_closed_connection_ends_the_client_cleanly(sim: HostileSim, client: SimClient) -> None:
    assert client.wait_next(0, TIMEOUT) is not None
    sim.misbehave("close")
    assert client.wait_disconnected(TIMEOUT)
    assert client.disconnect_reason is not None
    assert not client.connected
    assert client._sock is not None and client._sock.fileno() == -1  # shut down and closed, not leaked
    started = time.monotonic()
    assert client.wait_next(10**9, 5.0) is None
    assert time.monotonic() - started < 1.0  # its own slot is closed: no waiting on a dead link
    with pytest.raises(SimDisconnectedError):
        client.send_control(0.0, 0.0)
    client.close()
    client.close()


def test_the_link_reconnects_as_a_new_car_and_keeps_seq_growing(sim: HostileSim) -> None:
    link = fast_link(sim)
    camera, actuators = TwinCamera(link), TwinActuators(link)
    try:
        first = camera.read(-1, TIMEOUT)
        assert first is not None
        sim.misbehave("close")
        assert sim.wait_for(lambda: link.stats()["reconnects"] >= 1 and link.connected, TIMEOUT)
        frame = camera.read(first.seq, TIMEOUT)
        assert frame is not None and frame.seq > first.seq
        assert sim.cars() == 2
        control_arrives(sim, actuators.write, car=2)
        stats = link.stats()
        assert stats["connected"] and stats["disconnect_reason"]
    finally:
        actuators.close()
        camera.close()


def test_the_link_survives_a_twin_restart(sim: HostileSim) -> None:
    link = fast_link(sim)
    camera, actuators = TwinCamera(link), TwinActuators(link)
    seqs: list[int] = []
    try:
        frame = camera.read(-1, TIMEOUT)
        assert frame is not None
        seqs.append(frame.seq)
        sim.misbehave("restart", seconds=2.0)
        assert sim.wait_for(lambda: not link.connected, TIMEOUT)
        # While down: the camera waits its whole timeout (a caller cannot spin), writes are dropped.
        started = time.monotonic()
        assert camera.read(seqs[-1], 0.3) is None
        assert time.monotonic() - started >= 0.29
        actuators.write(0.1, 0.2)
        actuators.neutral()
        assert link.stats()["writes_dropped"] >= 2
        assert sim.wait_idle(TIMEOUT)
        assert sim.wait_for(lambda: link.connected, TIMEOUT)
        for _ in range(5):
            frame = camera.read(seqs[-1], TIMEOUT)
            assert frame is not None
            seqs.append(frame.seq)
        assert seqs == sorted(set(seqs))
        stats = link.stats()
        assert stats["reconnects"] >= 1 and stats["failed_attempts"] >= 1, stats
        control_arrives(sim, actuators.write, car=sim.connections[-1].number)
    finally:
        actuators.close()
        camera.close()


def test_close_is_idempotent_and_stops_reconnecting(sim: HostileSim) -> None:
    link = fast_link(sim)
    camera = TwinCamera(link)
    assert camera.read(-1, TIMEOUT) is not None
    sim.misbehave("restart", seconds=1.0)
    assert sim.wait_for(lambda: not link.connected, TIMEOUT)
    started = time.monotonic()
    link.close()
    link.close()
    camera.close()
    assert time.monotonic() - started < 3.0
    assert sim.wait_idle(TIMEOUT)
    connections = len(sim.connections)
    time.sleep(1.0)
    assert len(sim.connections) == connections, "the link reconnected after close()"
    assert link.stats()["connected"] is False


# -- the link's backends never raise for bad telemetry ---------------------------------------------
def test_the_camera_never_raises_on_bad_telemetry(sim: HostileSim) -> None:
    link = fast_link(sim)
    camera = TwinCamera(link)
    try:
        frame = camera.read(-1, TIMEOUT)
        assert frame is not None
        sim.misbehave("wrong_types", seconds=1.0)
        while not sim.wait_idle(0.0):
            got = camera.read(frame.seq, 0.2)
            if got is not None:
                assert got.imu is not None and got.imu.dtype == np.float64
                frame = got
        assert link.stats()["bad_messages"]["bad_field:accel_x"] >= 1
    finally:
        camera.close()


# -- sends never block the drive thread ------------------------------------------------------------
def test_a_simulator_that_stops_reading_costs_a_write_at_most_milliseconds() -> None:
    with HostileSim(rcvbuf=4096) as sim:
        link = fast_link(sim)
        actuators = TwinActuators(link)
        try:
            sim.misbehave("deaf", seconds=3.0)
            slowest, errors, writes = 0.0, 0, 0
            deadline = time.monotonic() + TIMEOUT
            while errors == 0 and time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    actuators.write(0.1, 0.2)
                except ActuatorError:
                    errors += 1
                slowest = max(slowest, time.perf_counter() - started)
                writes += 1
            assert errors == 1, f"the full socket was never noticed after {writes} writes"
            actuators.write(0.1, 0.2)  # the link is down now: dropped, not raised
            assert link.stats()["writes_dropped"] >= 1
            assert "not reading" in (link.stats()["disconnect_reason"] or "")
            # send_timeout is 5 ms; the margin is for a loaded machine's scheduling, not for blocking.
            assert slowest < 0.1, f"a write blocked for {slowest * 1e3:.1f} ms"
            assert sim.wait_idle(TIMEOUT)
            assert sim.wait_for(lambda: link.connected, TIMEOUT), "no reconnection after the simulator listened again"
            control_arrives(sim, actuators.write, car=sim.connections[-1].number)
        finally:
            actuators.close()
            link.close()


# -- the boundary checks, without a socket -----------------------------------------------------------
def png_base64(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("data", "reason"), [
    (42, "bad_field:image"),
    ("not base64!", "bad_image"),
    (base64.b64encode(b"\x89PNG\r\n\x1a\n junk").decode(), "bad_image"),
    (png_base64(161, 120), "image_size"),
    (base64.b64encode(bomb_png(20000, 20000)).decode(), "image_size"),
    (base64.b64encode(bomb_png(6000, 6000)).decode(), "image_size"),
])
def test_images_are_checked_before_decoding(data: object, reason: str) -> None:
    with pytest.raises(BadMessageError) as caught:
        decode_image(data, (160, 120))
    assert caught.value.reason == reason
    assert decode_image(png_base64(160, 120), (160, 120)).shape == (120, 160, 3)


def test_numbers_are_parsed_at_the_boundary() -> None:
    assert parse_numbers({"accel_x": "1.5", "gyro_y": 2, "speed": 0.5, "hit": "none"}) == {
        "accel_x": 1.5, "gyro_y": 2.0, "speed": 0.5}
    for bad in ("abc", [1], None, True, "nan", float("inf")):
        with pytest.raises(BadMessageError, match="accel_x"):
            parse_numbers({"accel_x": bad})


def test_the_inbound_cap_follows_the_camera_size() -> None:
    small = SimClient(camera={"img_w": 160, "img_h": 120})
    large = SimClient(camera={"img_w": 640, "img_h": 480})
    assert max_image_b64(160, 120) < small.max_inbound_bytes < 256 * 1024
    assert max_image_b64(640, 480) < large.max_inbound_bytes < 2 * 1024 * 1024
    assert SimClient(max_inbound_bytes=1000).max_inbound_bytes == 1000


def test_an_unreachable_simulator_is_a_sim_error() -> None:
    with HostileSim() as sim:
        port = sim.port
    with pytest.raises(SimError, match="cannot reach"):
        SimClient("127.0.0.1", port, connect_timeout=0.5).connect()
