"""The MQTT contract: topics and payloads (docs/mqtt.md). Every payload carries ``version``.

    donkey/<fleet>/<car_id>/state        retained: birth (online) on every connect; the will (offline)
    donkey/<fleet>/<car_id>/telemetry    QoS 0, {ts, values} at telemetry.rate_hz
    donkey/<fleet>/<car_id>/events       QoS 1, one event per message, unique id, from the durable outbox
    donkey/<fleet>/<car_id>/attestation  retained, from the fleet's attestation bridge: the car's signed token
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError

PAYLOAD_VERSION = 1
SEGMENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class TopicError(AgentError, ValueError):
    pass


class Topics:
    def __init__(self, fleet: str, car_id: str) -> None:
        for name, value in (("fleet", fleet), ("car_id", car_id)):
            if not SEGMENT.match(value):
                raise TopicError(f"telemetry.{name} {value!r}: use 1-64 letters, digits, '_' or '-'")
        self.base = f"donkey/{fleet}/{car_id}"
        self.state = f"{self.base}/state"
        self.telemetry = f"{self.base}/telemetry"
        self.events = f"{self.base}/events"
        self.attestation = f"{self.base}/attestation"  # subscribed only with attestation.require


def now_ms() -> int:
    return round(time.time() * 1000)


def birth(identity: dict[str, Any]) -> dict[str, Any]:
    return {"version": PAYLOAD_VERSION, "state": "online", "ts": now_ms(), **identity}


def will(car_id: str) -> dict[str, Any]:
    return {"version": PAYLOAD_VERSION, "state": "offline", "car_id": car_id}


def telemetry(seq: int, status: dict[str, Any], platform: dict[str, Any]) -> dict[str, Any]:
    """ThingsBoard / Node-RED shape: {ts, values}; ``seq`` lets a subscriber see gaps."""
    period = status.get("period_error_ms", {})
    values = {
        "mode": status["mode"],
        "steering": round(status["steering"], 4),
        "throttle": round(status["throttle"], 4),
        "loop_hz": status.get("rate_hz", 0.0),
        "period_error_p50_ms": period.get("p50", 0.0),
        "period_error_p99_ms": period.get("p99", 0.0),
        "period_error_max_ms": period.get("max", 0.0),
        "deadline_misses": status["deadline_misses"],
        "faults": status["faults"],
        "latched": status.get("latched", []),
        "max_throttle": status.get("max_throttle", 0.0),
        "frame_age_ms": status.get("frame_age_ms", {}).get("p50", 0.0),
        "recording": bool(status.get("recording", False)),
        "commands_refused": sum(lane.get("refused_full", 0) + lane.get("refused_rate", 0)
                                for lane in status.get("commands", {}).values()),
        **platform,
    }
    pacing = status.get("pacing", {})
    if "output_offset_ms" in pacing:  # locked pacing: the adaptive output offset and whether it is locked
        values["output_offset_ms"] = pacing["output_offset_ms"]
        values["phase_locked"] = bool(pacing["locked"])
    attestation = status.get("attestation")
    if attestation:  # attestation.require: the gate's state, and when the current token runs out
        values["attestation"] = attestation["state"]
        if attestation.get("expires_ms") is not None:
            values["attestation_expires_ms"] = attestation["expires_ms"]
    model = status.get("model") or {}
    if model.get("name") or model.get("path"):
        values["model"] = model.get("name") or Path(model["path"]).stem
        if model.get("version"):
            values["model_version"] = model["version"]
    rollout = status.get("rollout") or {}
    if rollout.get("phase"):
        values["model_rollout"] = rollout["phase"]
    if status.get("estop_held_by"):
        values["estop_held_by"] = status["estop_held_by"]
    recording = status.get("recording_stats")
    if recording:
        values["recording_written"] = int(recording.get("written", 0))
        values["recording_lost"] = int(recording.get("lost", 0))
    return {"version": PAYLOAD_VERSION, "seq": seq, "ts": now_ms(), "values": values}


def event(event_id: str, kind: str, detail: dict[str, Any], wall: float) -> dict[str, Any]:
    return {"version": PAYLOAD_VERSION, "id": event_id, "ts": round(wall * 1000), "kind": kind, "detail": detail}
