"""``AttestationGate``: may this car drive autonomously? A pure state machine, time and tokens in.

Why pure: like openpilot's ``selfdrived/state.py``, every rule is tested state by event with a fake clock, and the
caller (the drive core's gate, telemetry, doctor) owns threads and I/O. The gate never latches anything itself;
the caller latches the ``attestation`` fault when ``may_drive`` falls while driving.

States (``State``):

- ``no_token``: nothing accepted yet (start-up): deny.
- ``attested``: the newest accepted token says ``pass`` and has not expired: allow.
- ``denied``: the newest accepted token says ``fail``/``revoked``/``pending``/``timeout``/``unknown``: deny.
- ``expired``: the accepted ``pass`` token's ``exp`` has passed with no newer one: deny.
- ``invalid``: the newest token was rejected (bad signature, wrong car or UUID, malformed, from the future): deny.

A replayed token (validly signed, older than the last accepted) changes nothing: the state it would displace is
newer information, and a replayed ``pass`` must never undo a ``revoked``. It is counted and its reason kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.attest import token as tokens


class State(StrEnum):
    NO_TOKEN = "no_token"
    ATTESTED = "attested"
    DENIED = "denied"
    EXPIRED = "expired"
    INVALID = "invalid"


@dataclass(frozen=True)
class GateDecision:
    may_drive: bool  # autonomously (local, local_angle); manual driving is the caller's policy
    state: State
    reason: str


class AttestationGate:
    def __init__(self, *, car: str, uuid: str, trusted: Mapping[str, tokens.PublicKey], fleet: str | None = None,
                 max_skew_ms: int = 30_000) -> None:
        self.car = car
        self.uuid = uuid
        self.fleet = fleet
        self.trusted = dict(trusted)
        self.max_skew_ms = max_skew_ms
        self.state = State.NO_TOKEN
        self.reason = "no attestation token received yet"
        self.claims: tokens.Claims | None = None  # the last accepted token's claims
        self.rejected = 0
        self.replays = 0
        self.last_rejection = ""

    @property
    def decision(self) -> GateDecision:
        return GateDecision(self.state == State.ATTESTED, self.state, self.reason)

    def on_token(self, raw: bytes | str, now_ms: int) -> GateDecision:
        """A token arrived (the retained message on connect, or a new one)."""
        verdict = tokens.verify(raw, self.trusted, car=self.car, uuid=self.uuid, fleet=self.fleet, now_ms=now_ms,
                                max_skew_ms=self.max_skew_ms,
                                last_iat=self.claims.iat if self.claims is not None else None)
        if verdict.replay:
            self.replays += 1
            self.last_rejection = verdict.reason
            return self.on_tick(now_ms)
        if not verdict.ok or verdict.claims is None:
            self.rejected += 1
            self.last_rejection = verdict.reason
            self.state, self.reason = State.INVALID, f"token rejected: {verdict.reason}"
            return self.decision
        previous = self.claims
        if (previous is not None and verdict.claims.iat == previous.iat and verdict.claims.status == "pass"
                and previous.status != "pass"):  # same instant, two verdicts (two bridges): the denial stands
            self.replays += 1
            self.last_rejection = "a pass issued at the same instant as the accepted denial"
            return self.on_tick(now_ms)
        self.claims = verdict.claims
        if verdict.claims.status == "pass":
            self.state, self.reason = State.ATTESTED, f"attested: {verdict.reason}"
        else:
            self.state, self.reason = State.DENIED, f"attestation {verdict.reason}"
        return self.on_tick(now_ms)

    def on_tick(self, now_ms: int) -> GateDecision:
        """Time passes: an accepted ``pass`` token expires at its ``exp``."""
        if self.state == State.ATTESTED and self.claims is not None and now_ms >= self.claims.exp:
            self.state = State.EXPIRED
            self.reason = f"attestation token expired {now_ms - self.claims.exp} ms ago (no newer token)"
        return self.decision

    def snapshot(self) -> dict[str, Any]:
        """For telemetry, doctor and the retained state: plain JSON values."""
        claims = self.claims
        return {"state": str(self.state), "may_drive": self.state == State.ATTESTED, "reason": self.reason,
                "status": claims.status if claims else None, "issued_ms": claims.iat if claims else None,
                "expires_ms": claims.exp if claims else None, "release": claims.release if claims else None,
                "rejected": self.rejected, "replays": self.replays, "last_rejection": self.last_rejection}
