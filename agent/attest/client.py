"""The car's side of the attestation gate: fleet tokens in, the drive core's clearance out.

Runs on the agent's event loop. Each token that arrives on the car's attestation topic (retained, so a car that
connects gets the newest at once) goes through the pure ``AttestationGate``; its verdict goes to the drive core as
a ``Clearance`` whose expiry is the token's own, mapped onto the core's monotonic clock. So the core stops the car
when the token runs out even if nothing here runs again (a hung loop, a lost broker), and a revocation reaches it
on the next cycle after the token arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.attest.errors import AttestationSetupError
from agent.attest.gate import AttestationGate, GateDecision
from agent.attest.keylime_conf import KeylimeConfigError, read_agent_settings
from agent.attest.token import TokenError, load_public_keys
from agent.config import AttestationConfig
from agent.core.handoff import Clearance, Event, EventQueue


def now_ms() -> int:
    return round(time.time() * 1000)


class AttestationClient:
    def __init__(self, config: AttestationConfig, *, fleet: str, car: str, clearance: Clearance,
                 wall_ms: Callable[[], int] = now_ms, monotonic: Callable[[], float] = time.monotonic,
                 refresh_every_s: float = 10.0) -> None:
        try:
            uuid = config.agent_uuid or read_agent_settings().uuid
        except KeylimeConfigError as exc:
            raise AttestationSetupError(f"attestation.agent_uuid is not set and {exc}") from None
        try:
            trusted = load_public_keys(config.trusted_keys)
        except (TokenError, OSError) as exc:
            raise AttestationSetupError(f"attestation.trusted_keys: {exc}") from None
        self.uuid = uuid
        self.gate = AttestationGate(car=car, uuid=uuid, trusted=trusted, fleet=fleet,
                                    max_skew_ms=round(config.max_clock_skew_s * 1000))
        self.clearance = clearance
        self.events = EventQueue(64)
        self.wall_ms = wall_ms
        self.monotonic = monotonic
        self._state = ""
        # Without a valid token the car asks the fleet's bridge for a fresh one (any instance of the group takes
        # it), at most this often: e.g. after the bridge restarted, or a token that expired with the car offline.
        self.publish: Callable[[str, bytes], bool] | None = None
        self.refresh_topic = f"donkey/{fleet}/{car}/attestation/refresh"
        self.refresh_every_s = refresh_every_s
        self._refreshed = -float("inf")
        self.refreshes = 0

    def on_token(self, raw: bytes) -> None:
        """A message on the car's attestation topic (from the fleet link, on the loop)."""
        self._apply(self.gate.on_token(raw, self.wall_ms()))

    def tick(self) -> None:
        """Time passes: a token's expiry (the core checks it too, on its own clock); ask for one if we have none."""
        decision = self.gate.on_tick(self.wall_ms())
        self._apply(decision)
        now = self.monotonic()
        due = not decision.may_drive and now - self._refreshed >= self.refresh_every_s
        if due and self.publish is not None and self.publish(self.refresh_topic, b""):
            self._refreshed = now
            self.refreshes += 1

    def _apply(self, decision: GateDecision) -> None:
        claims = self.gate.claims
        valid_until = float("-inf")
        if decision.may_drive and claims is not None:
            valid_until = self.monotonic() + (claims.exp - self.wall_ms()) / 1000.0
        self.clearance.set(decision.may_drive, decision.reason, valid_until)
        key = f"{decision.state}:{claims.iat if claims else None}"
        if key != self._state:  # each new verdict once: a token's arrival, an expiry, a rejection
            self._state = key
            self.events.push(Event("attestation", {"state": str(decision.state), "may_drive": decision.may_drive,
                                                   "reason": decision.reason}))

    def status(self) -> dict[str, Any]:
        return {"uuid": self.uuid, **self.gate.snapshot()}
