"""Fleet commands: validation into typed core commands, and the response body (docs/mqtt.md#commands).

A command arrives on ``donkey/<fleet>/<car>/cmd/<name>`` as ``{"id": "...", "exp": <epoch s>, "value": ...}``.
Its states go to ``.../cmd/<name>/<id>/res`` (QoS 1, retained, with an MQTT 5 message expiry):
``init`` -> ``executing`` -> ``successful`` | ``failed`` with a ``reason``. Anything invalid (oversized or
deeply nested, malformed JSON, an unknown name, a missing or duplicate id, a retained message, an expired
command, a bad value) gets ``failed`` and changes nothing. The size and nesting limits are checked before
the JSON parser sees the payload, and the parser never raises (it is fuzzed, nesting included).

Values are validated here, once, into the drive core's typed commands (agent/core/commands.py); the core
itself re-checks expiry and the latched-fault gate when it applies them. ``estop`` is special: the MQTT
thread presses the car's stop board as soon as the message arrives (agent/telemetry/service.py), whatever
its payload, so nothing here can delay or refuse a stop; only a retained e-stop (a replay from the broker's
store, not a request) is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agent.core.commands import ClearFault, Command, CommandError, Record, SetMaxThrottle, SetMode
from agent.rollout.commands import ModelRollback, model_update

NAMES = ("estop", "clear_fault", "set_mode", "set_max_throttle", "record", "ping", "model_update", "model_rollback")
JOBS = ("model_update", "model_rollback")  # carried out by the agent (agent/rollout), not the drive core
ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_PAYLOAD = 4096
MAX_DEPTH = 8  # {"id": ..., "value": ...} needs 1; nothing legitimate needs more than a few
TIMEOUT_S = 2.0  # the drive core applies a command within this, or refuses it as expired
_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


@dataclass(frozen=True)
class Parsed:
    name: str
    id: str | None  # None when the payload carried no usable id (nowhere to answer)
    command: Command | None = None  # the typed command for the core (None for estop and ping)
    error: str = ""  # non-empty: answer "failed" with this reason and do nothing


def nesting_depth(payload: bytes) -> int:
    """The deepest ``[``/``{`` nesting outside strings (a linear scan; strings are skipped whole)."""
    depth = deepest = 0
    for match in _STRUCTURE.finditer(payload):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def load_object(payload: bytes) -> tuple[dict[str, Any] | None, str]:
    """The payload as a JSON object, or None and why; size and nesting are checked first."""
    if len(payload) > MAX_PAYLOAD:
        return None, f"payload over {MAX_PAYLOAD} bytes"
    if nesting_depth(payload) > MAX_DEPTH:
        return None, f"payload nested deeper than {MAX_DEPTH}"
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, "payload is not JSON"
    if not isinstance(message, dict):
        return None, "payload is not a JSON object"
    return message, ""


def command_id(payload: bytes) -> str | None:
    """The id of a payload, if it has a valid one (for answering an e-stop pressed before parsing)."""
    message, _ = load_object(payload)
    value = message.get("id") if message is not None else None
    return value if isinstance(value, str) and ID.match(value) else None


def parse(name: str, payload: bytes, *, now: float, received: float, seen: SeenIds,
          retained: bool = False) -> Parsed:
    """Validate one command; never raises. ``now`` is epoch seconds, ``received`` monotonic."""
    message, error = load_object(payload)
    if message is None:
        return Parsed(name, None, error=error)
    identifier = message.get("id")
    if not isinstance(identifier, str) or not ID.match(identifier):
        return Parsed(name, None, error="missing or invalid id (1-64 of A-Z a-z 0-9 _ . : -)")
    if name not in NAMES:
        return Parsed(name, identifier, error=f"unknown command {name!r}; commands: {', '.join(NAMES)}")
    if retained:
        # A retained command is a replay of an old request from the broker's store (a subscriber
        # connecting later), not a request to this run: never act on it.
        return Parsed(name, identifier, error="refused: retained commands are not executed; publish without retain")
    if seen.check_and_add(name, identifier):
        # Not answered: the retained state of the original command must stand.
        return Parsed(name, None, error=f"duplicate id {identifier!r}")
    expires = received + TIMEOUT_S
    expiry = message.get("exp")
    if expiry is not None:
        if isinstance(expiry, bool) or not isinstance(expiry, int | float) or not math.isfinite(expiry):
            return Parsed(name, identifier, error="exp must be a number (epoch seconds)")
        if expiry < now:
            return Parsed(name, identifier, error=f"expired {now - expiry:.1f} s ago")
        expires = min(expires, received + (expiry - now))
    try:
        command = _command(name, message.get("value"), identifier, received, expires)
    except CommandError as exc:
        return Parsed(name, identifier, error=str(exc))
    return Parsed(name, identifier, command)


def _command(name: str, value: Any, identifier: str, received: float, expires: float) -> Command | None:
    if name in ("estop", "ping"):
        if value is not None:
            raise CommandError(f"{name} takes no value")
        return None
    command: Command
    if name == "set_mode":
        command = SetMode(mode=value)
    elif name == "set_max_throttle":
        command = SetMaxThrottle(value=value)
    elif name == "record":
        if value not in ("start", "stop"):
            raise CommandError("value must be 'start' or 'stop'")
        command = Record(on=value == "start")
    elif name == "model_update":
        command = model_update(value)
    elif name == "model_rollback":
        if value is not None:
            raise CommandError("model_rollback takes no value")
        command = ModelRollback()
    else:
        if value is not None and not isinstance(value, str):
            raise CommandError("value must be a fault name, or absent for all latched faults")
        command = ClearFault(fault=value)
    command.source, command.id, command.received, command.expires = "mqtt", identifier, received, expires
    return command


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
