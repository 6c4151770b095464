"""Fleet commands: validation and the response state machine (docs/mqtt.md#commands).

A command arrives on ``donkey/<fleet>/<car>/cmd/<name>`` as ``{"id": "...", "exp": <epoch s>, "value": ...}``.
Its states go to ``.../cmd/<name>/<id>/res`` (QoS 1, retained: the retained message *is* the state):
``init`` -> ``executing`` -> ``successful`` | ``failed`` with a ``reason``. Anything invalid (malformed JSON,
an unknown name, a missing or duplicate id, an expired command, a bad value) gets ``failed`` and changes
nothing. Commands that could make the car move are refused while a fault is latched; ``estop`` is always
accepted. Parsing is pure: nothing here touches MQTT or the drive core.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agent.core.control import MODES

NAMES = ("estop", "clear_fault", "set_mode", "set_max_throttle", "record", "ping")
ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_PAYLOAD = 4096
MOVES_THE_CAR = {"set_mode", "set_max_throttle"}


@dataclass(frozen=True)
class Parsed:
    name: str
    id: str | None  # None when the payload carried no usable id (nowhere to answer)
    value: Any = None
    error: str = ""  # non-empty: answer "failed" with this reason and do nothing


def parse(name: str, payload: bytes, *, now: float, seen: SeenIds, latched: bool, max_throttle: float) -> Parsed:
    """Validate one command; never raises."""
    if len(payload) > MAX_PAYLOAD:
        return Parsed(name, None, error=f"payload over {MAX_PAYLOAD} bytes")
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return Parsed(name, None, error="payload is not JSON")
    if not isinstance(message, dict):
        return Parsed(name, None, error="payload is not a JSON object")
    command_id = message.get("id")
    if not isinstance(command_id, str) or not ID.match(command_id):
        return Parsed(name, None, error="missing or invalid id (1-64 of A-Z a-z 0-9 _ . : -)")
    if name not in NAMES:
        return Parsed(name, command_id, error=f"unknown command {name!r}; commands: {', '.join(NAMES)}")
    if seen.check_and_add(name, command_id):
        # Not answered: the retained state of the original command must stand.
        return Parsed(name, None, error=f"duplicate id {command_id!r}")
    expiry = message.get("exp")
    if expiry is not None:
        if isinstance(expiry, bool) or not isinstance(expiry, int | float) or not math.isfinite(expiry):
            return Parsed(name, command_id, error="exp must be a number (epoch seconds)")
        if expiry < now:
            return Parsed(name, command_id, error=f"expired {now - expiry:.1f} s ago")
    value = message.get("value")
    error = _check_value(name, value)
    if error:
        return Parsed(name, command_id, error=error)
    if latched and name in MOVES_THE_CAR:
        lowering = name == "set_max_throttle" and isinstance(value, int | float) and value <= max_throttle
        harmless = lowering or (name == "set_mode" and value == "user")
        if not harmless:
            return Parsed(name, command_id, error="refused: a fault is latched (clear it first)")
    return Parsed(name, command_id, value)


def _check_value(name: str, value: Any) -> str:
    if name == "set_mode" and value not in MODES:
        return f"value must be one of {', '.join(MODES)}"
    if name == "set_max_throttle" and (isinstance(value, bool) or not isinstance(value, int | float)
                                       or not math.isfinite(value) or not 0.0 <= value <= 1.0):
        return "value must be a number in [0, 1]"
    if name == "record" and value not in ("start", "stop"):
        return "value must be 'start' or 'stop'"
    if name == "clear_fault" and value is not None and not isinstance(value, str):
        return "value must be a fault name, or absent for all latched faults"
    if name in ("estop", "ping") and value is not None:
        return "takes no value"
    return ""


class SeenIds:
    """The last ``capacity`` command ids, to refuse a replayed or duplicated command."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[tuple[str, str], None] = OrderedDict()

    def check_and_add(self, name: str, command_id: str) -> bool:
        key = (name, command_id)
        if key in self._ids:
            return True
        self._ids[key] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False


def response(status: str, command_id: str, *, reason: str = "", result: Any = None, ts: int) -> dict[str, Any]:
    body: dict[str, Any] = {"version": 1, "id": command_id, "status": status, "ts": ts}
    if reason:
        body["reason"] = reason
    if result is not None:
        body["result"] = result
    return body
