"""The fleet link against a hostile fleet and a flaky world, on a real mosquitto and the real twin.

A command flood with an e-stop in the middle, a clear inside the e-stop's hold, a retained command waiting
at start, nested and oversized payloads; then a fleet link that cannot start (outbox unwritable, TLS files
missing, a broker host that does not resolve). Each time the car keeps driving on time, which is read from
the agent's own final summary and the twin's, and what the fleet sees is read with independent clients.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests import mosquitto
from tests.fakes.parts import wait_for
from tests.test_cli import start_twin
from tests.test_mqtt import conforms, retained, start_agent

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(mosquitto.available()), reason=mosquitto.available() or "ok")]
SUMMARY = re.compile(r"stopped \([^)]*\): (\d+) cycles, (\d+) deadline misses, (\d+) frames missed")


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def summary(log: str) -> tuple[int, int, int]:
    found = SUMMARY.search(log)
    assert found is not None, log[-3000:]
    cycles, misses, missed = map(int, found.groups())
    return cycles, misses, missed


def telemetry_values(lines: list[tuple[str, str]]) -> list[dict]:
    return [conforms("telemetry", json.loads(p))["values"] for t, p in lines if t.endswith("/telemetry")]


def test_a_flood_cannot_bury_an_estop_or_clear_it_early(tmp_path: Path) -> None:
    broker = mosquitto.Broker(tmp_path).start()
    twin, sim_port = start_twin("--track", "generated_track")
    base = "donkey/lab/car1"
    # A retained command waiting on the broker from some earlier session: it must not apply at start.
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-r", "-t",
                    f"{base}/cmd/set_max_throttle", "-m", json.dumps({"id": "stale-1", "value": 1.0})],
                   check=True, timeout=10)
    agent = start_agent(tmp_path, sim_port, broker.port, "car1", "", "--max-throttle", "0.3")
    client = publisher(broker.port)
    try:
        assert wait_for(lambda: retained(broker, f"{base}/state").get("state") == "online", 30, interval=0.2)
        results = broker.subscribe(f"{base}/cmd/+/+/res")
        watch = broker.subscribe(f"{base}/telemetry")
        events = broker.subscribe(f"{base}/events", "-q", "1")
        time.sleep(1.0)
        client.publish(f"{base}/cmd/set_mode", b'{"id": "n1", "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                       qos=1)  # nested and oversized
        client.publish(f"{base}/cmd/set_mode", b'{"id": "n2", "value": ' + b"[" * 50 + b"]" * 50 + b"}", qos=1)
        client.publish(f"{base}/cmd/set_mode", b"\xff\xfe" * 1000, qos=1)
        time.sleep(0.3)
        for i in range(300):  # a flood: valid commands, as fast as the broker takes them
            client.publish(f"{base}/cmd/set_max_throttle", json.dumps({"id": f"f{i}", "value": 0.25}), qos=1)
        client.publish(f"{base}/cmd/estop", json.dumps({"id": "stop-1"}), qos=1)
        for i in range(300):
            client.publish(f"{base}/cmd/set_mode", json.dumps({"id": f"g{i}", "value": "local"}), qos=1)
        time.sleep(0.3)
        client.publish(f"{base}/cmd/clear_fault", json.dumps({"id": "early-1"}), qos=1)  # inside the 1 s hold
        time.sleep(3.0)
        estopped = telemetry_values(mosquitto.collect(watch))
        client.publish(f"{base}/cmd/clear_fault", json.dumps({"id": "late-1"}), qos=1)  # after the hold
        time.sleep(2.0)
        event_kinds = [conforms("event", json.loads(p))["kind"] for _, p in mosquitto.collect(events)]
        states: dict[str, list[dict]] = {}
        for topic, payload in mosquitto.collect(results):
            states.setdefault(topic.split("/")[-2], []).append(json.loads(payload))
    finally:
        client.loop_stop()
        agent.send_signal(signal.SIGTERM)
        _, log = agent.communicate(timeout=30)
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
        broker.stop()
    assert agent.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    # the retained command was refused, with a reason, and the command-line limit stood
    assert states["stale-1"][-1]["status"] == "failed" and "retained" in states["stale-1"][-1]["reason"]
    assert all(v["max_throttle"] <= 0.3 for v in estopped)
    # the e-stop went through the flood, held, and the early clear was refused
    assert [s["status"] for s in states["stop-1"]] == ["init", "executing", "successful"]
    assert estopped and all("estop" in v["faults"] for v in estopped[-5:]) and all(v["throttle"] == 0.0
                                                                                 for v in estopped[-5:])
    assert states["early-1"][-1]["status"] == "failed" and "holds for at least" in states["early-1"][-1]["reason"]
    assert states["late-1"][-1]["status"] == "successful"
    assert {"estop", "fault", "fault_cleared", "command"} <= set(event_kinds)  # the fleet's audit trail
    # every flooded command has an answer or was counted: refused ones say why
    answered = [k for k in states if k[0] in "fg"]
    refused = [k for k in answered if states[k][-1]["status"] == "failed"]
    assert refused and all(("rate limit" in states[k][-1]["reason"] or "full" in states[k][-1]["reason"]
                            or "latched" in states[k][-1]["reason"]) for k in refused)
    counters = re.search(r"fleet link closed: inbound_dropped (\d+), unanswered (\d+), refused (\d+)", log)
    assert counters is not None, log[-2000:]
    dropped, unanswered, _ = map(int, counters.groups())
    assert len(answered) + dropped + unanswered >= 600
    assert "nested deeper than 8" in log and "payload over 4096 bytes" in log and "payload is not JSON" in log
    # the log was not flooded: the refusals were rate-limited with a count of what was suppressed
    assert log.count("command set_mode refused") < 60 and "similar lines suppressed" in log
    cycles, misses, missed = summary(log)
    assert cycles > 100 and misses == 0 and missed <= 3  # the drive loop kept time throughout


def test_a_fleet_link_that_cannot_start_never_stops_the_car_and_comes_back(tmp_path: Path) -> None:
    broker = mosquitto.Broker(tmp_path).start()
    twin, sim_port = start_twin("--track", "generated_track")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the outbox's directory should be")
    agents = {
        "unwritable": start_agent(tmp_path, sim_port, broker.port, "unwritable",
                                  f'outbox = "{blocker / "outbox.db"}"'),
        "notls": start_agent(tmp_path, sim_port, broker.port, "notls", f'ca = "{tmp_path / "missing-ca.pem"}"',
                             url=f"mqtts://127.0.0.1:{broker.port}"),
        "nohost": start_agent(tmp_path, sim_port, broker.port, "nohost", url="mqtt://no-such-broker.invalid:1883"),
    }
    try:
        time.sleep(4.0)  # the unwritable outbox fails, and is retried with a backoff (1 s, 2 s, ...)
        blocker.unlink()
        blocker.mkdir()  # the disk is fixed: the link comes back by itself
        assert wait_for(lambda: retained(broker, "donkey/lab/unwritable/state").get("state") == "online", 20,
                        interval=0.5)
        events = broker.subscribe("donkey/lab/unwritable/events", "-q", "1")
        time.sleep(3.0)
        replayed = [json.loads(p) for _, p in mosquitto.collect(events)]
    finally:
        logs = {}
        for name, agent in agents.items():
            agent.send_signal(signal.SIGTERM)
            logs[name] = agent.communicate(timeout=30)[1]
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
        broker.stop()
    for name, log in logs.items():
        assert agents[name].returncode == 0, f"{name}: {log[-3000:]}"
        cycles, misses, _ = summary(log)
        assert cycles > 100 and misses == 0, name  # driving on time, whatever the fleet link did
    assert "the fleet link failed (FileExistsError" in logs["unwritable"]  # cannot create the outbox's directory
    assert "started" in [e["kind"] for e in replayed]  # events from before the link came back were kept
    assert "the fleet link failed" in logs["notls"] and "missing-ca.pem" in logs["notls"]
