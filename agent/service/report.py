"""What the daemon says about the car: log lines for events, the status lines, the birth identity."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

from agent.config import AgentConfig
from agent.core.handoff import Event
from agent.service.state import boot_id

log = logging.getLogger("donkey-agent")

WARNING_KINDS = {"fault", "deadman", "deadman_neutral_failed", "estop"}


def log_event(event: Event) -> None:
    detail = ", ".join(f"{k}={v}" for k, v in event.detail.items() if v not in (None, ""))
    level = logging.INFO
    if event.kind in WARNING_KINDS or (event.kind == "command" and not event.detail.get("ok")):
        level = logging.WARNING
    if event.kind == "stopped" and event.detail.get("error"):
        level = logging.ERROR
    log.log(level, "%s: %s", event.kind, detail)


def status_line(status: dict[str, Any]) -> str:
    period = status.get("period_error_ms", {})
    age = status.get("frame_age_ms", {})
    invoke = status.get("invoke_ms", {})
    faults = ", ".join(status["faults"]) or "none"
    return (f"{status['mode']:11s} {status.get('rate_hz', 0):5.1f} Hz | period err p99 {period.get('p99', 0):5.2f} ms"
            f" | frame age p50 {age.get('p50', 0):5.1f} ms | invoke p50 {invoke.get('p50', 0):5.2f} ms"
            f" | steer {status['steering']:+.2f} throttle {status['throttle']:+.2f} | faults: {faults}")


def short_status(status: dict[str, Any]) -> str:
    """systemd's STATUS=: what `systemctl status` shows on one line."""
    faults = ", ".join(status["faults"]) or "none"
    p99 = status.get("period_error_ms", {}).get("p99", 0)
    return f"{status['mode']}, {status.get('rate_hz', 0):.1f} Hz, p99 period error {p99:.2f} ms, faults: {faults}"


def identity(config: AgentConfig) -> dict[str, Any]:
    """What the retained birth message says about this agent."""
    from agent import __version__

    model = config.autopilot.model
    model_sha = None
    if model is not None:
        try:
            model_sha = hashlib.sha256(model.read_bytes()).hexdigest()
        except OSError:
            model_sha = None
    digest = hashlib.sha256(config.model_dump_json(exclude={"source"}).encode()).hexdigest()[:16]
    return {"car_id": config.telemetry.car_id, "fleet": config.telemetry.fleet, "agent_version": __version__,
            "model_sha256": model_sha, "boot_id": boot_id(), "config_digest": digest, "pid": os.getpid(),
            "started_at": round(time.time(), 3)}


def changed_keys(old: AgentConfig, new: AgentConfig) -> list[str]:
    """The dotted keys whose values differ between two configs."""

    def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    a, b = flatten(old.model_dump(exclude={"source"})), flatten(new.model_dump(exclude={"source"}))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
