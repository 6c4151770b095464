"""The fleet link against a real mosquitto, observed with mosquitto_sub as an independent client."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.telemetry.outbox import Outbox
from tests import mosquitto
from tests.fakes.parts import wait_for
from tests.test_cli import start_twin

ROOT = Path(__file__).parent.parent
SCHEMAS = ROOT / "schemas"
pytestmark = pytest.mark.skipif(bool(mosquitto.available()), reason=mosquitto.available() or "ok")


def start_agent(tmp_path: Path, sim_port: int, broker_port: int, car: str = "car1", telemetry: str = "",
                *args: str, url: str | None = None) -> subprocess.Popen[str]:
    """`donkey-agent run` on the twin with the shipped model, linked to the broker as donkey/lab/<car>."""
    config = tmp_path / f"agent-{car}.toml"
    if "outbox" not in telemetry:
        telemetry += f'\noutbox = "{tmp_path / f"outbox-{car}.db"}"'
    config.write_text(f"""
[drive.realtime]
priority = 0
[telemetry]
keepalive_s = 2
rate_hz = 5
{telemetry}
""")
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim",
                             f"127.0.0.1:{sim_port}", "--model", str(ROOT / "models" / "pilot.tflite"),
                             "--mqtt", url or f"mqtt://127.0.0.1:{broker_port}", "--car-id", car, "--fleet", "lab",
                             *args],
                            stderr=subprocess.PIPE, text=True)


def conforms(schema: str, payload: dict) -> dict:
    """Validate a payload against its JSON Schema in schemas/ (the documented contract)."""
    from jsonschema import Draft202012Validator

    Draft202012Validator(json.loads((SCHEMAS / f"{schema}.json").read_text())).validate(payload)
    return payload


def retained(broker: mosquitto.Broker, topic: str) -> dict:
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, "-C", "1",
                          "-W", "5"], capture_output=True, text=True, timeout=10, check=False).stdout
    return json.loads(out.splitlines()[0]) if out.strip() else {}


@pytest.mark.slow
def test_presence_telemetry_events_and_last_will(tmp_path: Path) -> None:
    broker = mosquitto.Broker(tmp_path).start()
    twin, sim_port = start_twin("--track", "generated_track")
    watcher = broker.subscribe("donkey/#")
    agent = start_agent(tmp_path, sim_port, broker.port)
    try:
        assert wait_for(lambda: retained(broker, "donkey/lab/car1/state").get("state") == "online", 30, interval=0.2)
        time.sleep(3.0)
        messages = mosquitto.collect(watcher)
        birth = conforms("state", retained(broker, "donkey/lab/car1/state"))
        assert birth["version"] == 1 and birth["car_id"] == "car1" and birth["fleet"] == "lab"
        assert len(birth["model_sha256"]) == 64 and birth["boot_id"] and birth["config_digest"]

        telemetry = [conforms("telemetry", json.loads(p)) for t, p in messages if t == "donkey/lab/car1/telemetry"]
        assert len(telemetry) >= 8  # 5 Hz for about 3 s
        seqs = [m["seq"] for m in telemetry]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        values = telemetry[-1]["values"]
        assert telemetry[-1]["version"] == 1 and isinstance(telemetry[-1]["ts"], int)
        assert values["mode"] == "local" and values["faults"] == [] and values["loop_hz"] > 10
        assert {"steering", "throttle", "period_error_p99_ms", "deadline_misses", "frame_age_ms"} <= set(values)

        events = [conforms("event", json.loads(p)) for t, p in messages if t == "donkey/lab/car1/events"]
        kinds = [e["kind"] for e in events]
        assert "started" in kinds and "realtime" in kinds
        assert len({e["id"] for e in events}) == len(events)

        agent.kill()  # no goodbye: the broker publishes the will after 1.5 x keepalive
        agent.wait(10)
        assert wait_for(lambda: retained(broker, "donkey/lab/car1/state").get("state") == "offline", 15, interval=0.2)
        conforms("state", retained(broker, "donkey/lab/car1/state"))
    finally:
        if agent.poll() is None:
            agent.kill()
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
        broker.stop()


@pytest.mark.slow
def test_events_survive_a_broker_outage(tmp_path: Path) -> None:
    broker = mosquitto.Broker(tmp_path).start()
    twin, sim_port = start_twin("--track", "generated_track")
    agent = start_agent(tmp_path, sim_port, broker.port)
    try:
        assert wait_for(lambda: retained(broker, "donkey/lab/car1/state").get("state") == "online", 30, interval=0.2)
        broker.stop()  # the link drops mid-drive...
        time.sleep(0.5)
        twin.send_signal(signal.SIGTERM)  # ...and while it is down the car loses its camera: fault events
        twin.wait(20)
        time.sleep(2.0)
        broker = mosquitto.Broker(tmp_path, port=broker.port).start()
        watcher = broker.subscribe("donkey/lab/car1/events", "-q", "1")
        time.sleep(12)  # the agent reconnects with its backoff and replays the outbox
        received = [json.loads(p) for _, p in mosquitto.collect(watcher)]
        events = list({e["id"]: e for e in received}.values())  # QoS 1 is at least once: dedupe by id
        faults = [e["detail"]["fault"] for e in events if e["kind"] == "fault"]
        assert "stale_frame" in faults  # raised while the broker was down, delivered after
        ts = [e["ts"] for e in events]
        assert ts == sorted(ts)  # replayed in order
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        broker.stop()
    assert len(Outbox(tmp_path / "outbox-car1.db")) == 0  # every event was acknowledged, none left behind


@pytest.mark.slow
def test_command_state_machine_end_to_end(tmp_path: Path) -> None:
    broker = mosquitto.Broker(tmp_path).start()
    twin, sim_port = start_twin("--track", "generated_track")
    agent = start_agent(tmp_path, sim_port, broker.port)

    def send(name: str, body: dict) -> None:
        if name != "launch" and body.get("id") != "bad1":
            conforms("command", body)
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                        "-t", f"donkey/lab/car1/cmd/{name}", "-m", json.dumps(body)], check=True, timeout=10)

    try:
        assert wait_for(lambda: retained(broker, "donkey/lab/car1/state").get("state") == "online", 30, interval=0.2)
        watcher = broker.subscribe("donkey/lab/car1/cmd/+/+/res")
        telemetry = broker.subscribe("donkey/lab/car1/telemetry")
        time.sleep(0.5)
        send("set_max_throttle", {"id": "t1", "value": 0.2})
        send("set_mode", {"id": "bad1", "value": "turbo"})
        send("estop", {"id": "e1"})
        time.sleep(1.0)
        send("set_mode", {"id": "m1", "value": "local_angle"})  # refused: e-stop latched
        send("estop", {"id": "e1"})  # a duplicate: ignored, e1 keeps its state
        send("set_mode", {"id": "old", "value": "user", "exp": time.time() - 10})
        send("launch", {"id": "l1"})
        send("ping", {"id": "p1"})
        time.sleep(1.2)  # past the minimum hold (1 s) of the newest e-stop (the duplicate pressed again: safe)
        send("clear_fault", {"id": "c1"})
        time.sleep(1.5)
        states: dict[str, list[dict]] = {}
        for topic, payload in mosquitto.collect(watcher):
            states.setdefault(topic.split("/")[-2], []).append(conforms("command-response", json.loads(payload)))
        faults_seen = [json.loads(p)["values"]["faults"] for _, p in mosquitto.collect(telemetry)]
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
        broker.stop()

    def statuses(command_id: str) -> list[str]:
        return [s["status"] for s in states[command_id]]

    assert statuses("t1") == ["init", "executing", "successful"]
    assert statuses("bad1") == ["failed"] and "one of user" in states["bad1"][0]["reason"]
    assert statuses("e1") == ["init", "executing", "successful"]  # the duplicate did not overwrite it
    # The drive core itself refuses what could move the car while a fault is latched.
    assert statuses("m1") == ["init", "executing", "failed"] and "latched" in states["m1"][-1]["reason"]
    assert statuses("old") == ["failed"] and "expired" in states["old"][0]["reason"]
    assert statuses("l1") == ["failed"] and "unknown command" in states["l1"][0]["reason"]
    assert statuses("p1") == ["init", "successful"] and "pong" in states["p1"][-1]["result"]
    assert statuses("c1") == ["init", "executing", "successful"]
    assert ["estop"] in faults_seen  # the fleet saw the e-stop in telemetry
    assert agent.returncode == 0  # nothing received over MQTT hurt the agent


@pytest.mark.slow
def test_mqtt_3_1_1_and_driving_unaffected_by_a_dead_broker(tmp_path: Path) -> None:
    """Grafana-style MQTT 3.1.1 works; and with no broker at all the drive loop keeps every deadline."""
    broker = mosquitto.Broker(tmp_path).start()
    twin, sim_port = start_twin("--track", "generated_track")
    dead = mosquitto.free_port()  # nothing listens here
    try:
        v311 = start_agent(tmp_path, sim_port, broker.port, "old", 'protocol = "3.1.1"', "--duration", "6")
        cut_off = start_agent(tmp_path, sim_port, dead, "lonely", "", "--duration", "6")
        assert wait_for(lambda: retained(broker, "donkey/lab/old/state").get("state") == "online", 30, interval=0.2)
        _, cut_off_log = cut_off.communicate(timeout=60)
        v311.communicate(timeout=60)
    finally:
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
        broker.stop()
    assert cut_off.returncode == 0 and v311.returncode == 0
    pattern = r"stopped \(duration of 6 s reached\): (\d+) cycles, (\d+) deadline misses, (\d+) frames missed"
    summary = re.search(pattern, cut_off_log)
    assert summary is not None, cut_off_log[-2000:]
    cycles, misses, missed = map(int, summary.groups())
    assert cycles > 80 and misses == 0 and missed <= 2  # 20 Hz throughout, while the fleet link kept failing
    assert len(Outbox(tmp_path / "outbox-lonely.db")) >= 2  # its events wait in the outbox for a broker


@pytest.mark.slow
def test_home_assistant_discovery_and_rediscovery(tmp_path: Path) -> None:
    broker = mosquitto.Broker(tmp_path).start()
    twin, sim_port = start_twin("--track", "generated_track")
    agent = start_agent(tmp_path, sim_port, broker.port, "ha1", "homeassistant = true")
    try:
        assert wait_for(lambda: retained(broker, "donkey/lab/ha1/state").get("state") == "online", 30, interval=0.2)
        configs = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t",
                                  "homeassistant/#", "-v", "-W", "2"], capture_output=True, text=True, timeout=10,
                                 check=False).stdout.splitlines()
        watcher = broker.subscribe("homeassistant/#")
        time.sleep(0.5)
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "homeassistant/status",
                        "-m", "online"], check=True, timeout=10)
        time.sleep(1.0)
        republished = mosquitto.collect(watcher)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
        broker.stop()
    retained_configs = dict(line.split(" ", 1) for line in configs)
    mode = json.loads(retained_configs["homeassistant/sensor/donkey_lab_ha1/mode/config"])
    assert mode["state_topic"] == "donkey/lab/ha1/telemetry" and mode["availability_topic"] == "donkey/lab/ha1/state"
    assert mode["device"]["identifiers"] == ["donkey_lab_ha1"] and mode["unique_id"] == "donkey_lab_ha1_mode"
    assert "homeassistant/binary_sensor/donkey_lab_ha1/fault/config" in retained_configs
    # After "online" from Home Assistant every config is sent again (beyond the retained copies a new
    # subscriber gets at once).
    counts: dict[str, int] = {}
    for topic, _ in republished:
        if topic.endswith("/config"):
            counts[topic] = counts.get(topic, 0) + 1
    assert len(counts) == 8 and all(count >= 2 for count in counts.values())
