"""Benchmark: publishing to a local mosquitto, and what it does to the drive core's timing.

1. Sustained publish rate: a paho-mqtt 2.x client publishing telemetry-sized JSON (QoS 0) and events
   (QoS 1) as fast as it can for a few seconds; a second client counts what the broker delivers.
2. The drive core (bench/drive_loop.py, timer pacing, the twin and the shipped model) with no load and
   with a publisher flooding the broker from the same process; p99 period error compared.

Targets: >= 2,000 messages/s; the core's p99 unchanged within 10 %.
Writes bench/results/mqtt_publish.json. Needs Debian's mosquitto.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.drive_loop import RESULTS, machine, run_child, start_twin
from tests.mosquitto import Broker

PAYLOAD = json.dumps({"version": 1, "seq": 0, "ts": 0, "values": {f"k{i}": i * 0.5 for i in range(20)}})


def publish_rate(port: int, seconds: float, qos: int) -> dict[str, float]:
    received = [0]
    ready = threading.Event()
    subscriber = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscriber.on_message = lambda *args: received.__setitem__(0, received[0] + 1)
    subscriber.on_subscribe = lambda *args: ready.set()
    subscriber.connect("127.0.0.1", port)
    subscriber.subscribe("bench/rate", qos=qos)
    subscriber.loop_start()
    ready.wait(5)
    acknowledged = [0]  # QoS 0: written to the socket; QoS 1: PUBACK received
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.on_publish = lambda *args: acknowledged.__setitem__(0, acknowledged[0] + 1)
    publisher.max_inflight_messages_set(1000)
    publisher.max_queued_messages_set(2_000)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if publisher.publish("bench/rate", PAYLOAD, qos=qos).rc != mqtt.MQTT_ERR_SUCCESS:
            time.sleep(0.0005)  # paho's queue is full: back off
    published = acknowledged[0]  # counted up to the end of the window
    time.sleep(1.0)  # let the last ones arrive
    for client in (publisher, subscriber):
        client.loop_stop()
        client.disconnect()
    return {"qos": qos, "published_per_s": round(published / seconds),
            "delivered_per_s": round(min(received[0], published) / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    broker = Broker(Path(tempfile.mkdtemp())).start()
    os.environ["DONKEY_BENCH_BROKER_PORT"] = str(broker.port)
    twin, sim_port = start_twin()
    try:
        rates = [publish_rate(broker.port, 5.0, qos) for qos in (0, 1)]
        for rate in rates:
            print(f"QoS {rate['qos']}: published {rate['published_per_s']}/s, delivered {rate['delivered_per_s']}/s")
        runs = {load: run_child("ours", load, args.seconds, sim_port) for load in ("none", "mqtt-flood")}
    finally:
        twin.terminate()
        twin.wait(10)
        broker.stop()
    base, flood = runs["none"]["period_error_ms"], runs["mqtt-flood"]["period_error_ms"]
    print(f"drive core p99 period error: {base['p99']:.3f} ms alone, {flood['p99']:.3f} ms while publishing "
          f"{runs['mqtt-flood'].get('published_per_s')} messages/s from the same process (max {flood['max']:.3f} ms)")
    print(f"ratio: {flood['p99'] / max(base['p99'], 1e-3):.2f}x")
    result = {"machine": machine(), "publish": rates,
              "core": {load: {k: v for k, v in run.items() if k != "period_error_samples_ms"}
                       for load, run in runs.items()}}
    (RESULTS / "mqtt_publish.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS / 'mqtt_publish.json'}")


if __name__ == "__main__":
    main()
