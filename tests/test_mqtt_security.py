"""The fleet link over mutual TLS to a broker with passwords and an ACL pinning each car to its topics."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import mosquitto
from tests.pki import Pki
from tests.test_cli import start_twin

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(mosquitto.available()), reason=mosquitto.available() or "ok")]


def secure_broker(tmp_path: Path, pki: Pki) -> tuple[mosquitto.Broker, int]:
    server_cert, server_key = pki.issue("localhost", server=True)
    passwords = tmp_path / "passwords"
    subprocess.run([shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-c", "-b", str(passwords), "fleet",
                    "fleet-secret"], check=True, capture_output=True)
    acl = tmp_path / "acl"
    # Each car (its certificate's CN is its user name) may only use its own topics; the fleet sees all.
    acl.write_text("user fleet\ntopic readwrite donkey/#\n\npattern readwrite donkey/+/%u/#\n")
    tls_port, plain_port = mosquitto.free_port(), mosquitto.free_port()
    lines = [
        "per_listener_settings true",
        f"listener {tls_port} 127.0.0.1", f"cafile {pki.ca_path}", f"certfile {server_cert}",
        f"keyfile {server_key}", "require_certificate true", "use_identity_as_username true",
        "tls_version tlsv1.2", "allow_anonymous false", f"acl_file {acl}",
        f"listener {plain_port} 127.0.0.1", f"password_file {passwords}", "allow_anonymous false",
        f"acl_file {acl}",
    ]
    return mosquitto.Broker(tmp_path, port=tls_port, secure=lines).start(), plain_port


def fleet_sub(port: int, topic: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", "fleet", "-P", "fleet-secret",
                             "-t", topic, "-v"], stdout=subprocess.PIPE, text=True)


def start_agent(tmp_path: Path, pki: Pki, cert_cn: str, car_id: str, sim: int, port: int) -> subprocess.Popen:
    cert, key = pki.issue(cert_cn)
    config = tmp_path / f"agent-{car_id}.toml"
    config.write_text(f"""
[drive.realtime]
priority = 0
[telemetry]
url = "mqtts://127.0.0.1:{port}"
car_id = "{car_id}"
fleet = "lab"
ca = "{pki.ca_path}"
cert = "{cert}"
key = "{key}"
outbox = "{tmp_path / f'outbox-{car_id}.db'}"
""")
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim",
                             f"127.0.0.1:{sim}", "--model", str(ROOT / "models" / "pilot.tflite")],
                            stderr=subprocess.PIPE, text=True)


def test_mutual_tls_passwords_and_acl(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    broker, plain_port = secure_broker(tmp_path, pki)
    twin, sim = start_twin("--track", "generated_track")
    watcher = fleet_sub(plain_port, "donkey/#")
    honest = start_agent(tmp_path, pki, "car1", "car1", sim, broker.port)
    impostor = start_agent(tmp_path, pki, "car3", "car2", sim, broker.port)  # a car3 cert claiming car2's topics
    try:
        time.sleep(6)
        assert honest.poll() is None and impostor.poll() is None  # denial does not hurt either agent
        # Without a client certificate the broker refuses the TLS connection.
        denied = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile",
                                 str(pki.ca_path), "-t", "donkey/#", "-C", "1", "-W", "3"], capture_output=True,
                                timeout=20, check=False)
        assert denied.returncode != 0
    finally:
        for agent in (honest, impostor):
            agent.send_signal(signal.SIGTERM)
        logs = [agent.communicate(timeout=30)[1] for agent in (honest, impostor)]
        messages = mosquitto.collect(watcher)
        twin.send_signal(signal.SIGTERM)
        twin.wait(20)
        broker.stop()
    # Both reached the broker over mutual TLS (the impostor's certificate is valid, only its topics are not).
    assert "connected to mqtts://" in logs[0] and "as donkey/lab/car2" in logs[1]
    topics = {topic for topic, _ in messages}
    assert "donkey/lab/car1/state" in topics and "donkey/lab/car1/telemetry" in topics
    assert not any(topic.startswith("donkey/lab/car2/") for topic in topics)  # the ACL kept car3 out of car2
    birth = next(json.loads(p) for t, p in messages if t == "donkey/lab/car1/state")
    assert birth["state"] == "online"
