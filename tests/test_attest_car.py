"""The attestation gate on a real car run: `donkey-agent run` on a simulator, a real mosquitto, tokens signed
with a fleet key by the test (playing the fleet's bridge), and what reaches the wire read at the simulator.

The simulator is tests/hostile_sim.py, which records every control it receives with its arrival time, so "the car
stops" means throttle 0 in the controls the simulator got, not what the agent says about itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid as uuids
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.attest.token import Claims, sign
from tests import mosquitto
from tests.fakes.parts import wait_for
from tests.hostile_sim import HostileSim

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(bool(mosquitto.available()), reason=mosquitto.available() or "ok")
UUID = str(uuids.UUID(int=0xD0C0FFEE))


def fleet_key(tmp_path: Path, name: str = "fleet") -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / f"{name}.pub.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, public


def token(key: ec.EllipticCurvePrivateKey, status: str, *, lifetime_s: float = 30.0, car: str = "car1",
          at: float | None = None) -> bytes:
    issued = round((time.time() if at is None else at) * 1000)
    return sign(Claims("lab", car, UUID, status, issued, issued + round(lifetime_s * 1000), 1, f"verifier: {status}"),
                key)


def publish(broker: mosquitto.Broker, payload: bytes) -> None:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-r", "-t",
                    "donkey/lab/car1/attestation", "-m", payload.decode()], check=True, timeout=10)


def start_agent(tmp_path: Path, sim: HostileSim, broker: mosquitto.Broker, trusted: Path) -> subprocess.Popen[str]:
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[drive]
max_throttle = 0.4
[drive.realtime]
priority = 0
[telemetry]
url = "mqtt://127.0.0.1:{broker.port}"
car_id = "car1"
fleet = "lab"
keepalive_s = 2
outbox = "{tmp_path / 'outbox.db'}"
[attestation]
require = true
trusted_keys = ["{trusted}"]
agent_uuid = "{UUID}"
""")
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--sim",
                             f"127.0.0.1:{sim.port}", "--model", str(ROOT / "models" / "pilot.tflite")],
                            stderr=subprocess.PIPE, text=True)


def throttles_since(sim: HostileSim, since: float) -> list[tuple[float, float]]:
    return [(c.received, c.throttle) for c in sim.controls if c.received >= since]


def moving(sim: HostileSim, since: float) -> bool:
    return any(abs(t) > 0.01 for _, t in throttles_since(sim, since))


def stop(agent: subprocess.Popen[str]) -> str:
    agent.send_signal(signal.SIGTERM)
    try:
        _, log = agent.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        agent.kill()
        _, log = agent.communicate()
    return log


@pytest.mark.slow
def test_no_token_no_autonomy_then_a_revocation_stops_the_car_on_the_wire(tmp_path: Path) -> None:
    key, public = fleet_key(tmp_path)
    stranger, _ = fleet_key(tmp_path, "stranger")
    broker = mosquitto.Broker(tmp_path).start()
    events = broker.subscribe("donkey/lab/car1/events")
    refreshes = broker.subscribe("donkey/lab/car1/attestation/refresh")
    log = ""
    with HostileSim() as sim:
        agent = start_agent(tmp_path, sim, broker, public)
        try:
            assert wait_for(lambda: len(sim.controls) > 40, 40, interval=0.2), "the agent never drove the sim"
            time.sleep(1.0)
            assert not moving(sim, 0.0), "autonomy without a token"
            publish(broker, token(stranger, "pass"))  # signed by a key the car does not trust
            time.sleep(1.5)
            assert not moving(sim, 0.0), "a token from an untrusted key was accepted"

            publish(broker, token(key, "pass"))
            assert wait_for(lambda: moving(sim, time.monotonic() - 0.3), 10, interval=0.1), "attested, yet not moving"

            time.sleep(1.0)
            revoked_at = time.monotonic()
            publish(broker, token(key, "revoked"))
            assert wait_for(lambda: not moving(sim, time.monotonic() - 0.3), 5, interval=0.05)
            last_moving = max(at for at, throttle in throttles_since(sim, revoked_at - 1.0) if abs(throttle) > 0.01)
            # mosquitto_pub's own start-up (~50 ms) is in this; the car's part is one MQTT hop and a cycle
            print(f"revocation -> last moving control: {(last_moving - revoked_at) * 1000:.0f} ms")
            assert last_moving - revoked_at < 1.0, f"still driving {last_moving - revoked_at:.2f} s after revocation"

            publish(broker, token(key, "pass", at=time.time() - 60))  # a replayed older pass cannot undo it
            time.sleep(1.5)
            assert not moving(sim, time.monotonic() - 1.0)
        finally:
            log = stop(agent)
    messages = [json.loads(p) for _, p in mosquitto.collect(events)]
    asked = mosquitto.collect(refreshes)
    broker.stop()
    assert len(asked) >= 1  # without a token the car asked the fleet's bridge for one
    kinds = [(m["kind"], m.get("detail", {})) for m in messages]
    assert any(k == "fault" and d.get("fault") == "attestation" and d.get("latched") for k, d in kinds), kinds
    states = [d.get("state") for k, d in kinds if k == "attestation"]
    assert states == ["no_token", "invalid", "attested", "denied"], states  # the replay changed nothing
    assert "attestation required" in log


@pytest.mark.slow
def test_an_expiring_token_stops_the_car_by_itself(tmp_path: Path) -> None:
    key, public = fleet_key(tmp_path)
    broker = mosquitto.Broker(tmp_path).start()
    with HostileSim() as sim:
        agent = start_agent(tmp_path, sim, broker, public)
        try:
            assert wait_for(lambda: len(sim.controls) > 20, 40, interval=0.2)
            publish(broker, token(key, "pass", lifetime_s=3.0))
            issued = time.monotonic()
            assert wait_for(lambda: moving(sim, time.monotonic() - 0.3), 10, interval=0.1)
            assert wait_for(lambda: not moving(sim, time.monotonic() - 0.3), 8, interval=0.05)
            last_moving = max(at for at, throttle in throttles_since(sim, issued) if abs(throttle) > 0.01)
            print(f"token issued -> last moving control: {last_moving - issued:.2f} s (lifetime 3 s)")
            assert 2.0 < last_moving - issued < 3.6  # the token's 3 s, on the car's own clock
        finally:
            stop(agent)
    broker.stop()
