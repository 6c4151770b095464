"""The errors of the bundle pipeline: one root, one subclass per concern.

Every message names what is wrong (the file, the key, the field, the step) so an operator reading an
event or the CLI's output knows what to fix without a traceback. ``StageError`` is the single type
the staging pipeline raises; it carries the step that refused the bundle.
"""

from __future__ import annotations

from agent.errors import AgentError


class BundleError(AgentError, ValueError):
    """A bundle (or a part of one) the car refuses; the message says why."""


class ManifestError(BundleError):
    """``manifest.json`` is missing, not JSON, or breaks the schema (the message names the field)."""


class SignatureError(BundleError):
    """The signature is missing, malformed, made by an untrusted or expired key, or the files changed.

    ``reason`` is one of ``unsigned``, ``malformed``, ``tampered``, ``untrusted``, ``expired``, so a
    caller can count refusals by cause without parsing the message.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TrustStoreError(BundleError):
    """A trust-store entry that cannot be used (the message names the file and the problem)."""


class StoreError(AgentError, OSError):
    """The model store cannot do what was asked (no staged model, no previous one, busy, damaged)."""


class FetchError(BundleError, OSError):
    """A download that failed or was refused: HTTP status, timeout, size, space or digest."""


class ArchiveError(BundleError):
    """A tar file that is not a safe, flat bundle (the message names the member)."""


class SmokeError(BundleError):
    """The model failed its smoke test (load, finite outputs, invoke time), or its process did."""


class StageError(BundleError):
    """Staging refused a bundle; ``step`` names the step that refused it (see ``stage.STEPS``)."""

    def __init__(self, step: str, message: str, reason: str | None = None) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.reason = reason
        self.detail = message
