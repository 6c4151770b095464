"""The attestation token: the fleet's signed, short-lived statement of one car's Keylime verdict.

Why a token: a car cannot ask Keylime about itself (the verifier's API needs the admin identity, which never lives
on a car), so the fleet bridge signs what the verifier says and the car checks the signature with keys it trusts.

Wire format (one compact JSON object, UTF-8, the retained MQTT payload)::

    {"version": 1, "alg": "ES256" | "EdDSA", "kid": "<16 hex>", "claims": {...}, "sig": "<base64url>"}

``claims`` holds only strings, integers and null (no floats, so its canonical form is unambiguous)::

    {"typ": "donkey-attestation", "fleet": "...", "car": "...", "uuid": "<Keylime agent UUID>",
     "status": "pass" | "fail" | "pending" | "timeout" | "revoked" | "unknown",
     "iat": <issued, Unix ms>, "exp": <expires, Unix ms>, "release": <runtime policy release or null>,
     "reason": "<why, for people>"}

The signature is detached, over ``DOMAIN + canonical(claims)``, where canonical is ``json.dumps(claims,
sort_keys=True, separators=(",", ":"), ensure_ascii=True)``: ES256 is a DER ECDSA P-256/SHA-256 signature, EdDSA
is Ed25519; ``kid`` is the first 16 hex digits of SHA-256 over the signer's SubjectPublicKeyInfo (DER).
``iat`` is the replay counter: a car accepts nothing older than the last token it accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.errors import AgentError

TOKEN_VERSION = 1
TOKEN_TYPE = "donkey-attestation"
DOMAIN = b"donkey-attestation-token/1\x00"  # so no other signature by the fleet key can pass as a token
STATUSES = ("pass", "fail", "pending", "timeout", "revoked", "unknown")
MAX_TOKEN_BYTES = 4096
CLAIM_KEYS = frozenset({"typ", "fleet", "car", "uuid", "status", "iat", "exp", "release", "reason"})

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class TokenError(AgentError, ValueError):
    """A key that cannot sign or verify tokens (not P-256 or Ed25519, unreadable)."""


@dataclass(frozen=True)
class Claims:
    fleet: str
    car: str
    uuid: str
    status: str
    iat: int  # ms since the epoch
    exp: int
    release: int | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"typ": TOKEN_TYPE, "fleet": self.fleet, "car": self.car, "uuid": self.uuid, "status": self.status,
                "iat": self.iat, "exp": self.exp, "release": self.release, "reason": self.reason}


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one token: ``claims`` only when ``ok``; ``reason`` always says why."""

    ok: bool
    reason: str
    claims: Claims | None = None
    replay: bool = False  # a validly signed token older than the last accepted one


def canonical(claims: Mapping[str, Any]) -> bytes:
    return json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(key: PublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _algorithm(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise TokenError(f"ECDSA curve {key.curve.name}: tokens use P-256 (ES256) or Ed25519")


def load_private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TokenError(f"{path}: cannot load the fleet signing key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise TokenError(f"{path}: a {type(key).__name__}: the fleet key must be ECDSA P-256 or Ed25519")
    _algorithm(key)
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, PublicKey]:
    """Trusted fleet keys by key id, from PEM files (each may hold one PUBLIC KEY)."""
    keys: dict[str, PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise TokenError(f"{path}: cannot load a trusted fleet key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            raise TokenError(f"{path}: a {type(key).__name__}: trusted fleet keys are ECDSA P-256 or Ed25519")
        _algorithm(key)
        keys[key_id(key)] = key
    return keys


def sign(claims: Claims, key: PrivateKey) -> bytes:
    """The token's wire bytes (compact JSON)."""
    if claims.status not in STATUSES:
        raise TokenError(f"status {claims.status!r}: one of {', '.join(STATUSES)}")
    body = claims.as_dict()
    message = DOMAIN + canonical(body)
    signature = (key.sign(message) if isinstance(key, ed25519.Ed25519PrivateKey)
                 else key.sign(message, ec.ECDSA(hashes.SHA256())))
    token = {"version": TOKEN_VERSION, "alg": _algorithm(key), "kid": key_id(key.public_key()), "claims": body,
             "sig": _b64(signature)}
    return json.dumps(token, separators=(",", ":"), ensure_ascii=True).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse(raw: bytes | str) -> tuple[dict[str, Any], str]:
    """The token object, or an empty dict and the reason it is malformed."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > MAX_TOKEN_BYTES:
        return {}, f"malformed: {len(data)} bytes (at most {MAX_TOKEN_BYTES})"
    try:
        token = json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}, f"malformed: not JSON ({exc})"
    if not isinstance(token, dict):
        return {}, "malformed: not a JSON object"
    if token.get("version") != TOKEN_VERSION:
        return {}, f"malformed: version {token.get('version')!r} (expected {TOKEN_VERSION})"
    for name in ("alg", "kid", "sig"):
        if not isinstance(token.get(name), str):
            return {}, f"malformed: {name} missing or not a string"
    claims = token.get("claims")
    if not isinstance(claims, dict):
        return {}, "malformed: claims missing or not an object"
    if set(claims) != CLAIM_KEYS:
        return {}, f"malformed: claims keys {sorted(claims)} (expected {sorted(CLAIM_KEYS)})"
    for name in ("typ", "fleet", "car", "uuid", "status", "reason"):
        if not isinstance(claims[name], str):
            return {}, f"malformed: claims.{name} is not a string"
    if not (_is_int(claims["iat"]) and _is_int(claims["exp"])):
        return {}, "malformed: claims.iat and claims.exp must be integers (ms)"
    if claims["release"] is not None and not _is_int(claims["release"]):
        return {}, "malformed: claims.release must be an integer or null"
    if claims["typ"] != TOKEN_TYPE:
        return {}, f"malformed: claims.typ {claims['typ']!r}"
    if claims["status"] not in STATUSES:
        return {}, f"malformed: claims.status {claims['status']!r}"
    return token, ""


def _signature_ok(token: dict[str, Any], key: PublicKey) -> bool:
    try:
        signature = _unb64(token["sig"])
    except (binascii.Error, ValueError):
        return False
    message = DOMAIN + canonical(token["claims"])
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify(raw: bytes | str, trusted: Mapping[str, PublicKey], *, car: str, uuid: str, now_ms: int,
           max_skew_ms: int = 30_000, last_iat: int | None = None, fleet: str | None = None) -> Verdict:
    """Check one token for this car; never raises on bad input, the reason says what is wrong.

    Order: well-formed, signed by a trusted key, for this car and UUID (and fleet), not issued in the future
    beyond ``max_skew_ms``, not older than the last accepted (``last_iat``), not expired (no skew allowed).
    A valid token may still deny driving: the gate reads ``claims.status``.
    """
    token, problem = _parse(raw)
    if problem:
        return Verdict(False, problem)
    key = trusted.get(token["kid"])
    if key is None:
        return Verdict(False, f"untrusted key {token['kid']!r} (not among the {len(trusted)} trusted fleet keys)")
    if token["alg"] != _algorithm(key):
        return Verdict(False, f"alg {token['alg']!r} does not match the trusted key ({_algorithm(key)})")
    if not _signature_ok(token, key):
        return Verdict(False, "bad signature (not signed by the trusted key, or altered)")
    body = token["claims"]
    claims = Claims(fleet=body["fleet"], car=body["car"], uuid=body["uuid"], status=body["status"], iat=body["iat"],
                    exp=body["exp"], release=body["release"], reason=body["reason"])
    if claims.car != car:
        return Verdict(False, f"token for car {claims.car!r}, this car is {car!r}")
    if claims.uuid.lower() != uuid.lower():
        return Verdict(False, f"token for Keylime agent {claims.uuid}, this car's agent is {uuid}")
    if fleet is not None and claims.fleet != fleet:
        return Verdict(False, f"token for fleet {claims.fleet!r}, this car is in {fleet!r}")
    if claims.exp <= claims.iat:
        return Verdict(False, "malformed: expires before it is issued")
    if claims.iat > now_ms + max_skew_ms:
        return Verdict(False, f"not yet valid: issued {claims.iat - now_ms} ms ahead of this car's clock "
                              f"(allowed skew {max_skew_ms} ms)")
    if last_iat is not None and claims.iat < last_iat:
        return Verdict(False, f"replay: issued {last_iat - claims.iat} ms before the last accepted token",
                       replay=True)
    if now_ms >= claims.exp:  # no leeway here: a car with a slow clock must not drive on past the token
        return Verdict(False, f"expired {now_ms - claims.exp} ms ago")
    return Verdict(True, f"{claims.status}: {claims.reason}" if claims.reason else claims.status, claims)
