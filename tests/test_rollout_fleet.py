"""The fleet rolls a signed model out to a real car: `donkey-agent run` on the twin, a real mosquitto, the bundle
served by a local HTTP server, every step watched by an independent `mosquitto_sub`.

model_update over MQTT -> download, verification and smoke test (in the agent's staging child) -> staged -> shadow
trial on live frames -> the swap waits while the car drives -> the operator stops the car (set_mode user) ->
activated -> model_rollback over MQTT -> the previous model drives again. The automatic rollback on a misbehaving
model is tested in process (tests/test_rollout_core.py), where the misbehaviour can be injected.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from agent.bundle.signing import sign_with_key
from tests import mosquitto
from tests.bundles import make_bundle, make_key
from tests.test_attest_car import stop
from tests.test_cli import start_twin
from tests.test_mqtt import conforms

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(bool(mosquitto.available()), reason=mosquitto.available() or "ok")


def signed_tar(tmp_path: Path, private: Path, version: str) -> Path:
    directory = make_bundle(tmp_path / f"pilot-{version}", version=version)
    sign_with_key(directory, private)
    archive = tmp_path / "www" / f"pilot-{version}.tar"
    archive.parent.mkdir(exist_ok=True)
    with tarfile.open(archive, "w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.mark.slow
def test_a_signed_model_rolls_out_over_mqtt_waits_for_the_car_to_stop_and_rolls_back(tmp_path: Path) -> None:
    private, public = make_key(tmp_path, "fleet")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "fleet.pem").write_bytes(public.read_bytes())
    store = tmp_path / "store"
    first = signed_tar(tmp_path, private, "1.0.0")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[drive.realtime]
priority = 0
[telemetry]
keepalive_s = 2
rate_hz = 5
outbox = "{tmp_path / 'outbox.db'}"
[models]
trust_dir = "{trust}"
store = "{store}"
[models.rollout]
shadow_min_frames = 40
probation_s = 600
""")
    # the car's first model, installed before it ever drove (as provisioning does): made active at start
    install = subprocess.run([sys.executable, "-m", "agent.cli", "model", "install", str(first), "--config",
                              str(config)], capture_output=True, text=True, timeout=60, check=False)
    assert install.returncode == 0, install.stderr + install.stdout
    update = signed_tar(tmp_path, private, "2.0.0")
    digest, size = hashlib.sha256(update.read_bytes()).hexdigest(), update.stat().st_size
    server, http_port = serve(update.parent)
    broker = mosquitto.Broker(tmp_path).start()
    twin, sim_port = start_twin("--track", "generated_track")
    events = broker.subscribe("donkey/lab/car1/events")
    answers = broker.subscribe("donkey/lab/car1/cmd/+/+/res")
    states = broker.subscribe("donkey/lab/car1/state")
    telemetry_log = (tmp_path / "telemetry.jsonl").open("w")  # a file, not a pipe: 5 Hz for a minute fills one
    telemetry = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t",
                                  "donkey/lab/car1/telemetry"], stdout=telemetry_log)

    def send(name: str, body: dict) -> None:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                        "-t", f"donkey/lab/car1/cmd/{name}", "-m", json.dumps(body)], check=True, timeout=10)

    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim",
                              f"127.0.0.1:{sim_port}", "--mqtt", f"mqtt://127.0.0.1:{broker.port}", "--car-id", "car1",
                              "--fleet", "lab"], stderr=subprocess.PIPE, text=True)
    log = ""
    try:
        time.sleep(6)  # ready and driving on 1.0.0
        send("model_update", {"id": "u-1", "value": {"url": f"http://127.0.0.1:{http_port}/{update.name}",
                                                       "sha256": digest, "size": size, "version": "2.0.0"}})
        send("model_update", {"id": "u-2", "value": {"url": "ftp://example/x.tar", "sha256": digest, "size": size,
                                                       "version": "2.0.1"}})  # refused at once: not http(s)
        time.sleep(25)  # staged, then 40 frames in shadow, then the swap waits: the car is driving
        send("set_mode", {"id": "m-1", "value": "user"})  # the operator stops it
        time.sleep(4)
        send("set_mode", {"id": "m-2", "value": "local"})
        time.sleep(3)
        send("model_rollback", {"id": "r-1"})
        time.sleep(1.5)
        send("set_mode", {"id": "m-3", "value": "user"})
        time.sleep(4)
    finally:
        log = stop(agent)
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
        server.shutdown()
        seen = [json.loads(p) for _, p in mosquitto.collect(events)]
        replies = [json.loads(p) for _, p in mosquitto.collect(answers)]
        retained = [json.loads(p) for _, p in mosquitto.collect(states)]
        telemetry.terminate()
        telemetry.wait(5)
        telemetry_log.close()
        values = [json.loads(line)["values"] for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
        broker.stop()
    steps = [m["detail"].get("step") for m in seen if m["kind"] == "model"]
    stages = [(m["detail"].get("step"), m["detail"].get("status")) for m in seen if m["kind"] == "model_stage"]
    final = {r["id"]: r for r in replies}
    assert "u-1" in final, log[-3000:]
    assert final["u-1"]["status"] == "successful" and "staged pilot 2.0.0" in final["u-1"]["reason"], final
    assert final["u-2"]["status"] == "failed" and "http" in final["u-2"]["reason"]
    for step in ("fetch", "unpack", "signature", "key_validity", "manifest", "digests", "smoke", "store"):
        assert (step, "passed") in stages, (step, stages)
    expected = ["update_requested", "staged", "shadow_started", "shadow_passed", "activation_waiting", "activated",
                "rollback_started", "activation_waiting", "rolled_back"]  # the rollback too waits for a stop
    assert [s for s in steps if s in expected] == expected, (steps, log[-3000:])
    activated = next(m["detail"] for m in seen if m["kind"] == "model" and m["detail"].get("step") == "activated")
    assert activated["model_version"] == "2.0.0" and len(activated["model_sha256"]) == 64
    waiting = next(m["detail"] for m in seen if m["detail"].get("step") == "activation_waiting")
    assert "moving" in waiting["detail"]
    versions = [v.get("model_version") for v in values]
    assert versions[0] == "1.0.0" and "2.0.0" in versions and versions[-1] == "1.0.0", versions
    assert "waiting_for_stop" in [v.get("model_rollout") for v in values]
    assert final["r-1"]["status"] == "successful"
    # the retained state followed the rollout: pending while it waited, then the new model active, then back
    slots = [(m.get("models") or {}) for m in retained if m.get("state") == "online"]
    pending = [m["pending"]["version"] for m in slots if m.get("pending")]
    active = [m["active"]["version"] for m in slots if m.get("active")]
    assert "2.0.0" in pending and active[0] == "1.0.0" and "2.0.0" in active and active[-1] == "1.0.0", slots
    assert all(conforms("state", m) for m in retained)
