"""The attestation token and the AttestationGate: every rejection reason, and the gate state by event."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.attest import token as tokens
from agent.attest.gate import AttestationGate, State

CAR, UUID, FLEET = "car7", "0f9c3c1e-4c1b-4a47-9d0e-9b6b1f6d6a01", "lab"
T0 = 1_800_000_000_000  # ms


@pytest.fixture(params=["ES256", "EdDSA"])
def fleet_key(request):
    return ec.generate_private_key(ec.SECP256R1()) if request.param == "ES256" else ed25519.Ed25519PrivateKey.generate()


def trusted(*keys) -> dict:
    return {tokens.key_id(key.public_key()): key.public_key() for key in keys}


def claims(status="pass", iat=T0, lifetime=30_000, **changes) -> tokens.Claims:
    base = tokens.Claims(fleet=FLEET, car=CAR, uuid=UUID, status=status, iat=iat, exp=iat + lifetime, release=4,
                         reason="operational_state 3 GET_QUOTE")
    return replace(base, **changes)


def check(raw, keys, now=T0 + 1000, **kwargs):
    options = {"car": CAR, "uuid": UUID, "fleet": FLEET, "now_ms": now, "max_skew_ms": 5000, **kwargs}
    return tokens.verify(raw, keys, **options)


def test_valid_token(fleet_key):
    raw = tokens.sign(claims(), fleet_key)
    verdict = check(raw, trusted(fleet_key))
    assert verdict.ok and verdict.claims == claims()
    body = json.loads(raw)
    assert set(body) == {"version", "alg", "kid", "claims", "sig"} and body["claims"]["typ"] == "donkey-attestation"


def test_wrong_key(fleet_key):
    other = ec.generate_private_key(ec.SECP256R1())
    verdict = check(tokens.sign(claims(), other), trusted(fleet_key))
    assert not verdict.ok and "untrusted key" in verdict.reason
    # A signature by another key under the trusted key's id.
    forged = json.loads(tokens.sign(claims(), other))
    forged["kid"] = tokens.key_id(fleet_key.public_key())
    forged["alg"] = json.loads(tokens.sign(claims(), fleet_key))["alg"]
    verdict = check(json.dumps(forged), trusted(fleet_key))
    assert not verdict.ok and "bad signature" in verdict.reason


def test_altered_claims_break_the_signature(fleet_key):
    body = json.loads(tokens.sign(claims(status="revoked"), fleet_key))
    body["claims"]["status"] = "pass"
    verdict = check(json.dumps(body), trusted(fleet_key))
    assert not verdict.ok and "bad signature" in verdict.reason


def test_wrong_uuid_car_and_fleet(fleet_key):
    keys = trusted(fleet_key)
    assert "Keylime agent" in check(tokens.sign(claims(uuid="1" * 8 + UUID[8:]), fleet_key), keys).reason
    assert "for car 'car8'" in check(tokens.sign(claims(car="car8"), fleet_key), keys).reason
    assert "fleet 'other'" in check(tokens.sign(claims(fleet="other"), fleet_key), keys).reason
    assert check(tokens.sign(claims(uuid=UUID.upper()), fleet_key), keys).ok  # UUIDs compare case-insensitively


def test_expiry_has_no_leeway(fleet_key):
    raw = tokens.sign(claims(lifetime=30_000), fleet_key)
    assert check(raw, trusted(fleet_key), now=T0 + 29_999).ok
    verdict = check(raw, trusted(fleet_key), now=T0 + 30_000)
    assert not verdict.ok and verdict.reason.startswith("expired")


def test_clock_skew(fleet_key):
    ahead = tokens.sign(claims(iat=T0 + 5000), fleet_key)
    assert check(ahead, trusted(fleet_key), now=T0).ok  # within the allowed 5 s
    too_far = tokens.sign(claims(iat=T0 + 5001), fleet_key)
    verdict = check(too_far, trusted(fleet_key), now=T0)
    assert not verdict.ok and verdict.reason.startswith("not yet valid")


def test_replay_of_an_older_token(fleet_key):
    older = tokens.sign(claims(iat=T0 - 10), fleet_key)
    verdict = check(older, trusted(fleet_key), last_iat=T0)
    assert not verdict.ok and verdict.replay and verdict.reason.startswith("replay")
    assert check(tokens.sign(claims(), fleet_key), trusted(fleet_key), last_iat=T0).ok  # the same instant again


MALFORMED = [
    b"", b"not json", b"[]", b"{}", b'{"version": 2}', "\u00ff".encode("latin-1"), b"{" * 5000,
    b'{"version":1,"alg":"ES256","kid":"x","sig":"x"}',
    b'{"version":1,"alg":"ES256","kid":"x","sig":"x","claims":[]}',
    b'{"version":1,"version":1,"alg":"ES256","kid":"x","sig":"x","claims":{}}',
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_input_never_raises(raw, fleet_key):
    verdict = check(raw, trusted(fleet_key))
    assert not verdict.ok and verdict.reason


@pytest.mark.parametrize("field,value", [("iat", 1.5), ("iat", True), ("status", "ok"), ("typ", "jwt"),
                                         ("release", "4"), ("car", 7), ("extra", 1)])
def test_malformed_claims(fleet_key, field, value):
    body = json.loads(tokens.sign(claims(), fleet_key))
    body["claims"][field] = value
    verdict = check(json.dumps(body), trusted(fleet_key))
    assert not verdict.ok and verdict.reason.startswith("malformed")


def test_bad_signature_encoding(fleet_key):
    body = json.loads(tokens.sign(claims(), fleet_key))
    body["sig"] = "!!!not base64!!!"
    assert "bad signature" in check(json.dumps(body), trusted(fleet_key)).reason


def test_keys_load_from_pem(tmp_path, fleet_key):
    private = tmp_path / "fleet.key"
    public = tmp_path / "fleet.pub"
    private.write_bytes(fleet_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    public.write_bytes(fleet_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    keys = tokens.load_public_keys([public])
    assert check(tokens.sign(claims(), tokens.load_private_key(private)), keys).ok
    p384 = tmp_path / "p384.key"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(tokens.TokenError, match="P-256"):
        tokens.load_private_key(p384)


# The gate, state by event (as openpilot's tests/test_state_machine.py).

@pytest.fixture
def key():
    return ec.generate_private_key(ec.SECP256R1())


def gate_for(key) -> AttestationGate:
    return AttestationGate(car=CAR, uuid=UUID, fleet=FLEET, trusted=trusted(key), max_skew_ms=5000)


def drive(gate: AttestationGate, key, events):
    """Apply (kind, value, now) events; kind 'token' signs claims, 'raw' sends bytes, 'tick' passes time."""
    for kind, value, now in events:
        if kind == "token":
            gate.on_token(tokens.sign(value, key), now)
        elif kind == "raw":
            gate.on_token(value, now)
        else:
            gate.on_tick(now)
    return gate.decision


PASS, REVOKED = claims(), claims(status="revoked", iat=T0 + 5000, lifetime=10**9)
SETUPS = {
    State.NO_TOKEN: [],
    State.ATTESTED: [("token", PASS, T0)],
    State.DENIED: [("token", PASS, T0), ("token", REVOKED, T0 + 5000)],
    State.EXPIRED: [("token", PASS, T0), ("tick", None, T0 + 30_000)],
    State.INVALID: [("token", PASS, T0), ("raw", b"garbage", T0 + 1000)],
}
EVENTS = {
    "fresh_pass": ("token", claims(iat=T0 + 6000), T0 + 6000),
    "fail": ("token", claims(status="fail", iat=T0 + 6000), T0 + 6000),
    "revoked": ("token", claims(status="revoked", iat=T0 + 6000), T0 + 6000),
    "pending": ("token", claims(status="pending", iat=T0 + 6000), T0 + 6000),
    "replayed_pass": ("token", claims(iat=T0 - 1000), T0 + 6000),
    "garbage": ("raw", b"\x00garbage", T0 + 6000),
    "wrong_car": ("token", claims(car="car8", iat=T0 + 6000), T0 + 6000),
    "tick_early": ("tick", None, T0 + 6000),
    "tick_late": ("tick", None, T0 + 40_000),
}
# Expected state after each (state, event). A replay changes nothing; a tick only expires an attested token.
# From no_token an "old" pass is no replay (nothing was accepted before) and still unexpired: attested.
EXPECTED = {
    State.NO_TOKEN: {"fresh_pass": State.ATTESTED, "fail": State.DENIED, "revoked": State.DENIED,
                     "pending": State.DENIED, "replayed_pass": State.ATTESTED, "garbage": State.INVALID,
                     "wrong_car": State.INVALID, "tick_early": State.NO_TOKEN, "tick_late": State.NO_TOKEN},
    State.ATTESTED: {"fresh_pass": State.ATTESTED, "fail": State.DENIED, "revoked": State.DENIED,
                     "pending": State.DENIED, "replayed_pass": State.ATTESTED, "garbage": State.INVALID,
                     "wrong_car": State.INVALID, "tick_early": State.ATTESTED, "tick_late": State.EXPIRED},
    State.DENIED: {"fresh_pass": State.ATTESTED, "fail": State.DENIED, "revoked": State.DENIED,
                   "pending": State.DENIED, "replayed_pass": State.DENIED, "garbage": State.INVALID,
                   "wrong_car": State.INVALID, "tick_early": State.DENIED, "tick_late": State.DENIED},
    State.EXPIRED: {"fresh_pass": State.ATTESTED, "fail": State.DENIED, "revoked": State.DENIED,
                    "pending": State.DENIED, "replayed_pass": State.EXPIRED, "garbage": State.INVALID,
                    "wrong_car": State.INVALID, "tick_early": State.EXPIRED, "tick_late": State.EXPIRED},
    State.INVALID: {"fresh_pass": State.ATTESTED, "fail": State.DENIED, "revoked": State.DENIED,
                    "pending": State.DENIED, "replayed_pass": State.INVALID, "garbage": State.INVALID,
                    "wrong_car": State.INVALID, "tick_early": State.INVALID, "tick_late": State.INVALID},
}


@pytest.mark.parametrize("state", list(SETUPS))
@pytest.mark.parametrize("event", list(EVENTS))
def test_gate_state_by_event(key, state, event):
    gate = gate_for(key)
    assert drive(gate, key, SETUPS[state]).state == state
    decision = drive(gate, key, [EVENTS[event]])
    expected = EXPECTED[state][event]
    assert decision.state == expected, decision.reason
    assert decision.may_drive == (expected == State.ATTESTED)


def test_a_replayed_pass_never_undoes_a_revocation(key):
    gate = gate_for(key)
    drive(gate, key, [("token", PASS, T0), ("token", REVOKED, T0 + 5000), ("token", PASS, T0 + 5001)])
    assert gate.state == State.DENIED and gate.replays == 1 and gate.last_rejection.startswith("replay")


def test_a_pass_at_the_same_instant_as_a_denial_loses(key):
    gate = gate_for(key)
    drive(gate, key, [("token", claims(status="revoked"), T0), ("token", claims(), T0)])
    assert gate.state == State.DENIED and gate.replays == 1


def test_snapshot_is_plain_json(key):
    gate = gate_for(key)
    drive(gate, key, [("token", PASS, T0)])
    snapshot = json.loads(json.dumps(gate.snapshot()))
    assert snapshot["state"] == "attested" and snapshot["may_drive"] and snapshot["expires_ms"] == PASS.exp
