"""The attestation bridge: verifier answers -> tokens, the revocation webhook, and publishing to a real broker.

Verifier answers are recorded responses (tests/fixtures/keylime/README.md names their sources); revocation
notifications are built by keylime 7.14.3's own ``cloud_verifier_common.prepare_error`` and turned into the
webhook's JSON the way ``revocation_notifier.notify_webhook`` does (``keylime.json.bytes_to_str``).
"""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.attest import token as tokens
from agent.attest.bridge import Bridge, BridgeConfig, in_shard, load_config, parse_revocation, serve
from agent.attest.gate import AttestationGate, State
from agent.attest.verifier import VerifierClient, map_status
from tests import mosquitto
from tests.keylime_inproc import keylime_ima

FIXTURES = Path(__file__).parent / "fixtures" / "keylime"
UUID = "d432fbb3-d2f1-4a97-9ef7-75bd81c00001"
FLEET, CAR = "lab", "car7"


def recorded(name: str) -> dict:
    return json.loads((FIXTURES / f"verifier_agent_{name}.json").read_text())


def attesting(now: float, age: float = 1.0, **changes) -> dict:
    results = recorded("get_quote")["results"]
    results.update(last_successful_attestation=int(now - age), **changes)
    return results


# Mapping the verifier's status to a token status.

def test_recorded_failed_agent_from_keylime_docs():
    mapped = map_status(recorded("failed")["results"], now_s=1676644600, max_age_s=60)
    assert mapped.status == "fail" and "operational_state 7 FAILED" in mapped.reason
    assert "qoute_validation.quote_validation" in mapped.reason


@pytest.mark.parametrize("changes,age,status", [
    ({}, 1, "pass"),
    ({"operational_state": 4}, 1, "pass"),  # GET_QUOTE_RETRY: still under attestation
    ({"operational_state": 5}, 1, "pass"),
    ({}, 61, "timeout"),  # the verifier stopped getting good quotes
    ({"attestation_count": 0}, 1, "pending"),
    ({"operational_state": 0}, 1, "pending"), ({"operational_state": 1}, 1, "pending"),
    ({"operational_state": 2}, 1, "pending"), ({"operational_state": 8}, 1, "pending"),
    ({"operational_state": 9}, 1, "fail"), ({"operational_state": 10}, 1, "fail"),
    ({"operational_state": None, "attestation_status": "PASS"}, 1, "pass"),  # push mode
    ({"operational_state": None, "attestation_status": "FAIL"}, 1, "fail"),
    ({"operational_state": None, "attestation_status": "TIMEOUT"}, 1, "timeout"),
    ({"operational_state": None, "attestation_status": "PENDING"}, 1, "pending"),
    ({"operational_state": "3"}, 1, "unknown"),
    ({"operational_state": None, "attestation_status": "MAYBE"}, 1, "unknown"),
])
def test_status_mapping(changes, age, status):
    now = 1_800_000_000.0
    assert map_status(attesting(now, age, **changes), now, max_age_s=60).status == status


def test_unknown_agent_is_unknown():
    assert map_status(None, 0, 60).status == "unknown"


class FakeVerifier:
    def __init__(self, statuses: dict) -> None:
        self.statuses = statuses

    def agents(self):
        return copy.deepcopy(self.statuses)

    def agent(self, uuid):
        return copy.deepcopy(self.statuses.get(uuid))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_bridge(statuses: dict, clock: Clock, **config) -> tuple[Bridge, list, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    published: list = []
    settings = BridgeConfig(fleet=FLEET, mqtt_url="mqtt://unused", signing_key=Path("unused"), verifier_url="unused",
                            cars={CAR: UUID}, **config)
    bridge = Bridge(settings, key, FakeVerifier(statuses), lambda *message: published.append(message), clock=clock)
    return bridge, published, key


def claims_of(message) -> dict:
    return json.loads(message[1])["claims"]


def test_poll_publishes_a_retained_signed_token():
    clock = Clock(1_800_000_000.0)
    bridge, published, key = make_bridge({UUID: attesting(clock.now)}, clock)
    bridge.poll_once()
    topic, payload, retain, expiry = published[-1]
    assert (topic, retain, expiry) == (f"donkey/{FLEET}/{CAR}/attestation", True, 30.0)
    verdict = tokens.verify(payload, {tokens.key_id(key.public_key()): key.public_key()}, car=CAR, uuid=UUID,
                            fleet=FLEET, now_ms=round(clock.now * 1000))
    assert verdict.ok and verdict.claims is not None and verdict.claims.status == "pass"
    assert verdict.claims.exp - verdict.claims.iat == 30_000


def test_iat_strictly_increases_even_within_one_millisecond():
    clock = Clock(1_800_000_000.0)
    bridge, published, _ = make_bridge({UUID: attesting(clock.now)}, clock)
    for _ in range(3):
        bridge.poll_once()
    iats = [claims_of(message)["iat"] for message in published]
    assert iats == sorted(set(iats))


def test_unknown_agent_and_unreachable_verifier():
    clock = Clock(1_800_000_000.0)
    bridge, published, _ = make_bridge({}, clock)
    bridge.poll_once()
    assert claims_of(published[-1])["status"] == "unknown"
    from agent.attest.verifier import VerifierError

    def down():
        raise VerifierError("connection refused")
    bridge.verifier.agents = down
    published.clear()
    assert bridge.poll_once() == [] and published == []  # no token: the cars' tokens run out on their own


def test_a_revocation_holds_until_the_verifier_attests_again():
    clock = Clock(1_800_000_000.0)
    statuses = {UUID: attesting(clock.now)}
    bridge, published, _ = make_bridge(statuses, clock)
    bridge.revoke({"type": "revocation", "agent_id": UUID, "event_id": "ima.pcr_mismatch",
                   "severity_label": "emergency"})
    revoked = claims_of(published[-1])
    assert revoked["status"] == "revoked" and "ima.pcr_mismatch" in revoked["reason"] and published[-1][3] is None
    clock.now += 1  # the verifier's database still says PASS (the poll raced the webhook)
    bridge.poll_once()
    assert claims_of(published[-1])["status"] == "revoked"
    clock.now += 5
    statuses[UUID]["last_successful_attestation"] = int(clock.now)  # re-enrolled, attested after the revocation
    bridge.poll_once()
    assert claims_of(published[-1])["status"] == "pass"


def test_another_instance_learns_the_revocation_from_the_retained_token():
    clock = Clock(1_800_000_000.0)
    first, published, _ = make_bridge({UUID: attesting(clock.now)}, clock)
    first.revoke({"agent_id": UUID, "type": "revocation"})
    second, published2, _ = make_bridge({UUID: attesting(clock.now)}, clock)
    second.observe(published[-1][1])
    second.poll_once()
    assert claims_of(published2[-1])["status"] == "revoked"


def test_shards_split_the_fleet():
    uuids = [f"00000000-0000-4000-8000-{index:012d}" for index in range(200)]
    counts = [sum(in_shard(uuid, (index, 3)) for uuid in uuids) for index in range(3)]
    assert sum(counts) == 200 and min(counts) > 40
    clock = Clock(1_800_000_000.0)
    bridge, _, _ = make_bridge({uuid: attesting(clock.now) for uuid in uuids}, clock, discover=True, shard=(1, 3))
    served = bridge.cars(bridge.verifier.agents())
    assert all(in_shard(uuid, (1, 3)) for uuid in served.values()) and len(served) in (counts[1], counts[1] + 1)


# The revocation webhook, shaped by keylime's own code.

def keylime_notification(agent_uuid: str, revocation_key_pem: str = "") -> bytes:
    keylime_ima()  # makes keylime importable (gpg) and quiet
    from keylime import cloud_verifier_common
    from keylime import json as keylime_json
    from keylime.failure import Component, Failure

    failure = Failure(Component.IMA)
    failure.add_event("pcr_mismatch", "IMA measurement list does not match TPM PCR", True)
    agent = {"ip": "127.0.0.1", "agent_id": agent_uuid, "port": 9002, "tpm_policy": "{}", "meta_data": "{}",
             "revocation_key": revocation_key_pem}
    tosend = cloud_verifier_common.prepare_error(agent, event=failure.highest_severity_event)
    return json.dumps(keylime_json.bytes_to_str(tosend)).encode()  # what requests posts with json=


def test_parse_keylime_notification_unsigned():
    message, problem = parse_revocation(keylime_notification(UUID))
    assert problem == "" and message is not None
    assert (message["agent_id"], message["type"], message["event_id"]) == (UUID, "revocation", "ima.pcr_mismatch")


def test_parse_keylime_notification_signed():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    body = keylime_notification(UUID, pem)
    message, problem = parse_revocation(body, key.public_key())
    assert message is not None and problem == ""
    envelope = json.loads(body)
    envelope["msg"] = envelope["msg"].replace(UUID, UUID[:-1] + "2")
    assert parse_revocation(json.dumps(envelope).encode(), key.public_key())[0] is None
    assert parse_revocation(keylime_notification(UUID), key.public_key())[0] is None  # unsigned, but a key is set


@pytest.mark.parametrize("body", [b"", b"{}", b'{"msg": "not json"}', b'{"msg": "{}"}', b"[1]"])
def test_parse_refuses_other_bodies(body):
    message, problem = parse_revocation(body)
    assert message is None and problem


# End to end: a verifier answering recorded JSON, a real mosquitto, the bridge's serve(), a car's gate.

class RecordedVerifier:
    """An HTTP server answering GET /v2.5/agents/... from recorded responses (the TLS is not what is tested)."""

    def __init__(self) -> None:
        self.results = attesting(time.time())
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.results["last_successful_attestation"] = int(time.time()) if outer.attesting else \
                    outer.results["last_successful_attestation"]
                if self.path.startswith("/v2.5/agents/?bulk"):
                    body = {"code": 200, "status": "Success", "results": {UUID: outer.results}}
                elif self.path == f"/v2.5/agents/{UUID}":
                    body = {"code": 200, "status": "Success", "results": outer.results}
                else:
                    body = recorded("not_found")
                data = json.dumps(body).encode()
                self.send_response(body["code"])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.attesting = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_verifier_client_reads_recorded_responses():
    verifier = RecordedVerifier()
    try:
        client = VerifierClient(verifier.url, ca=None, cert=None, key=None)
        assert client.agent(UUID)["operational_state"] == 3
        assert client.agent("00000000-0000-4000-8000-000000000000") is None
        assert set(client.agents()) == {UUID}
    finally:
        verifier.close()


@pytest.mark.skipif(bool(mosquitto.available()), reason=mosquitto.available() or "ok")
def test_bridge_end_to_end_revocation_stops_the_car(tmp_path):
    import paho.mqtt.client as mqtt

    broker = mosquitto.Broker(tmp_path).start()
    verifier = RecordedVerifier()
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "fleet.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    webhook_port = mosquitto.free_port()
    (tmp_path / "bridge.toml").write_text(
        f'[bridge]\nfleet = "{FLEET}"\nmqtt_url = "mqtt://127.0.0.1:{broker.port}"\n'
        f'signing_key = "{tmp_path / "fleet.key"}"\npoll_interval_s = 0.5\ntoken_lifetime_s = 3\n'
        f'webhook = "127.0.0.1:{webhook_port}"\n[verifier]\nurl = "{verifier.url}"\n[cars]\n{CAR} = "{UUID}"\n')
    config = load_config(tmp_path / "bridge.toml")
    gate = AttestationGate(car=CAR, uuid=UUID, fleet=FLEET, trusted={tokens.key_id(key.public_key()): key.public_key()})
    lock = threading.Lock()
    seen: list[tuple[str, int | None]] = []

    car = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client, userdata, message):
        with lock:
            gate.on_token(message.payload, round(time.time() * 1000))
            expiry = getattr(message.properties, "MessageExpiryInterval", None)
            seen.append((gate.state.value, expiry))

    car.on_message = on_message
    car.on_connect = lambda client, *args: client.subscribe(f"donkey/{FLEET}/{CAR}/attestation", qos=1)
    car.connect("127.0.0.1", broker.port)
    car.loop_start()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(config, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while gate.state != State.ATTESTED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gate.state == State.ATTESTED, gate.reason
        # The car asks for a refresh through the shared subscription: one more token arrives.
        with lock:
            before = len(seen)
        car.publish(f"donkey/{FLEET}/{CAR}/attestation/refresh", b"", qos=1)
        # The verifier's webhook, exactly as keylime sends it. The verifier gets no more good quotes from this agent,
        # but its status still says GET_QUOTE for a while (the poll races the webhook).
        verifier.attesting = False
        revoked_at = time.monotonic()
        request = urllib.request.Request(f"http://127.0.0.1:{webhook_port}/", data=keylime_notification(UUID),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        while gate.state != State.DENIED and time.monotonic() < revoked_at + 5:
            time.sleep(0.01)
        assert gate.state == State.DENIED and "revoked" in gate.reason
        assert time.monotonic() - revoked_at < 1.0
        time.sleep(1.2)  # two more polls: the verifier still says PASS, the revocation holds
        assert gate.state == State.DENIED
        with lock:
            assert len(seen) > before + 1
            assert ("attested", 3) in seen and ("denied", None) in seen  # pass tokens expire on the broker
        # A car connecting now gets the retained revoked token.
        newcomer = broker.subscribe(f"donkey/{FLEET}/{CAR}/attestation", "-C", "1", "-W", "5")
        newcomer.wait(6)
        (_topic, payload), = mosquitto.collect(newcomer)
        assert json.loads(payload)["claims"]["status"] == "revoked"
    finally:
        stop.set()
        thread.join(5)
        car.loop_stop()
        car.disconnect()
        verifier.close()
        broker.stop()
