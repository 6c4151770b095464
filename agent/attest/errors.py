"""The attestation gate's set-up error, importable without the cryptography the gate itself needs."""

from __future__ import annotations

from agent.errors import AgentError


class AttestationSetupError(AgentError, ValueError):
    """The gate cannot be set up as configured: the message names the key."""
