"""Fleet commands for models: validated where they enter, carried out by the rollout on the agent's loop.

They are not drive-core commands: the core only ever sees the result (a ``SwapPilot`` while the car is stopped).
They travel through their own lane (``jobs``) to the rollout manager, which takes them promptly and sets their
outcome when the step the fleet asked for is done: ``model_update`` once the bundle is downloaded, verified,
smoke-tested and staged (activation follows when the car stops, reported as events); ``model_rollback`` once the
previous model is back in the active slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlparse

from agent.core.commands import Command, CommandError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
MAX_URL = 2048


@dataclass(slots=True, kw_only=True)
class ModelUpdate(Command):
    """A signed bundle to fetch and stage: where it is, and what it must be (sha256 and size of the archive)."""

    url: str
    sha256: str
    size: int
    version: str
    name: ClassVar[str] = "model_update"
    answer_within_s: ClassVar[float] = 900.0  # a download and a smoke test take minutes on a slow link

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or len(self.url) > MAX_URL:
            raise CommandError(f"url must be a string of at most {MAX_URL} characters")
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CommandError(f"url must be http:// or https:// with a host, not {self.url!r:.80}")
        if not isinstance(self.sha256, str) or not SHA256.match(self.sha256):
            raise CommandError("sha256 must be 64 lowercase hex digits (the archive's digest)")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise CommandError(f"size must be a positive integer (bytes), not {self.size!r:.40}")
        if not isinstance(self.version, str) or not VERSION.match(self.version):
            raise CommandError(f"version must be 1-64 of A-Z a-z 0-9 . _ + - , not {self.version!r:.40}")


@dataclass(slots=True, kw_only=True)
class ModelRollback(Command):
    """Back to the previous model (applied when the car is stopped)."""

    name: ClassVar[str] = "model_rollback"
    answer_within_s: ClassVar[float] = 120.0


def model_update(value: object) -> ModelUpdate:
    """The command from a fleet payload's ``value``: {"url", "sha256", "size", "version"}."""
    if not isinstance(value, dict):
        raise CommandError('value must be an object: {"url": ..., "sha256": ..., "size": ..., "version": ...}')
    unknown = sorted(set(value) - {"url", "sha256", "size", "version"})
    if unknown:
        raise CommandError(f"unknown keys in value: {', '.join(map(str, unknown))[:80]}")
    missing = [key for key in ("url", "sha256", "size", "version") if key not in value]
    if missing:
        raise CommandError(f"value lacks {', '.join(missing)}")
    return ModelUpdate(url=value["url"], sha256=value["sha256"], size=value["size"], version=value["version"])
