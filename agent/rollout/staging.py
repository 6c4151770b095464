"""Staging a bundle in a child process: the daemon stays small, and a bad bundle cannot hurt it.

Verifying an OpenSSF Model Signing bundle imports sigstore (about 50 MB that would stay in the daemon for its
whole life), and a smoke test loads an untrusted model. So the daemon runs ``python -m agent.rollout.staging``
with its own effective configuration on stdin; the child stages with agent/bundle and reports every step as a
JSON line (the daemon turns each into an event), then the result. The store's lock and journal make the child's
changes to the slots as safe as the daemon's own; the parent reads the staged slot when the child is done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agent.config import AgentConfig
from agent.errors import AgentError


class StagingError(AgentError, RuntimeError):
    """The child refused the bundle (the message names the step and why) or failed."""


def stage_in_child(config: AgentConfig, source: str, *, sha256: str | None = None, size: int | None = None,
                   on_step: Callable[[str, dict[str, Any]], None] | None = None,
                   timeout_s: float = 3600.0) -> dict[str, Any]:
    """Stage ``source`` (a path or URL) in a child; returns its summary, raises StagingError."""
    argv = [sys.executable, "-m", "agent.rollout.staging", source]
    if sha256:
        argv += ["--sha256", sha256]
    if size:
        argv += ["--size", str(size)]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    assert child.stdin is not None and child.stdout is not None
    deadline = time.monotonic() + timeout_s
    result: dict[str, Any] | None = None
    try:
        child.stdin.write(config.model_dump_json())
        child.stdin.close()
        for line in child.stdout:
            message = _parse(line)
            if "step" in message and on_step is not None:
                on_step(str(message["step"]), dict(message.get("detail") or {}))
            elif "result" in message:
                result = message
            if time.monotonic() > deadline:
                raise StagingError(f"staging did not finish within {timeout_s:.0f} s")
        child.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        stderr = child.stderr.read() if child.stderr else ""
    if result is None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        raise StagingError(f"the staging process ended ({child.returncode}) without a result" +
                            (f": {tail}" if tail else ""))
    if not result["result"]:
        raise StagingError(str(result.get("error") or "refused"))
    return dict(result.get("summary") or {})


def _parse(line: str) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _emit(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message, default=str) + "\n")
    out.flush()


def main() -> int:
    from agent.bundle.errors import StageError, StoreError
    from agent.bundle.stage import settings_from_config, stage_bundle, stage_url, store_root
    from agent.bundle.store import ModelStore
    from agent.bundle.trust import TrustStore
    from agent.config import ConfigError, validate

    parser = argparse.ArgumentParser(description="stage a model bundle for the running agent (internal)")
    parser.add_argument("source")
    parser.add_argument("--sha256")
    parser.add_argument("--size", type=int)
    args = parser.parse_args()
    out = sys.stdout
    try:
        config = validate(json.loads(sys.stdin.read()), "<the agent's configuration>")
    except (ValueError, ConfigError) as exc:
        _emit(out, {"result": False, "error": f"bad configuration from the agent: {exc}"})
        return 2
    store = ModelStore(store_root(config))
    trust = TrustStore.load(config.models.trust_dir)
    settings = settings_from_config(config)

    def on_step(step: str, detail: dict[str, Any]) -> None:
        _emit(out, {"step": step, "detail": detail})

    try:
        store.recover()
        if args.source.startswith(("http://", "https://")):
            staged = stage_url(args.source, sha256=args.sha256, size=args.size, downloads=store.root / "downloads",
                               store=store, trust=trust, settings=settings, on_step=on_step)
        else:
            staged = stage_bundle(Path(args.source), store=store, trust=trust, settings=settings, on_step=on_step)
    except (StageError, StoreError) as exc:
        problems = f" (trust store: {'; '.join(trust.problems)})" if trust.problems else ""
        _emit(out, {"result": False, "error": f"{exc}{problems}"})
        return 1
    _emit(out, {"result": True, "summary": staged.summary()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
