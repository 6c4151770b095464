"""Framing and value coercion for the Donkey simulator protocol.

The Unity simulator cuts inbound JSON objects by brace depth (no separator needed, so
back-to-back ``}{`` is legal and gym-donkeycar relies on it) and terminates every outbound
object with ``\\n`` (gym-donkeycar waits for ``}\\n``). Numbers travel as JSON strings from
clients and as JSON numbers from the simulator; both sides here accept either.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# A complete string literal, an unterminated one (a lone quote: wait for more bytes),
# or a structural brace. Scanning with a regex keeps a control flood from costing a
# Python-level loop per byte.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|"|[{}]', re.DOTALL)

DEFAULT_MAX_OBJECT_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """A message that is well-formed JSON but not a valid protocol message."""


@dataclass
class FramingStats:
    """What the splitter threw away, so a server can log each kind once per peer."""

    malformed: int = 0  # objects that were not valid JSON objects
    oversized: int = 0  # objects longer than the cap, discarded unread
    garbage_bytes: int = 0  # bytes outside any object


@dataclass
class JsonObjectSplitter:
    """Incrementally splits a byte stream into JSON objects by brace depth.

    ``feed()`` returns the complete objects found so far; an incomplete tail is kept.
    Braces inside string literals are ignored. An object longer than ``max_object_bytes``
    is skipped without being buffered (the connection stays usable), and invalid JSON
    is counted and skipped: one bad message never poisons the ones after it.
    """

    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    stats: FramingStats = field(default_factory=FramingStats)
    _buffer: str = ""
    _scan: int = 0  # where scanning resumes inside the current object
    _depth: int = 0
    _discarding: bool = False  # inside an oversized object: drop until it closes

    @property
    def pending_bytes(self) -> int:
        """Bytes held for an object that has not closed yet."""
        return len(self._buffer)

    def feed(self, data: bytes | str) -> list[dict[str, Any]]:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        self._buffer += text
        return list(self._drain())

    def _drain(self) -> Iterator[dict[str, Any]]:
        while True:
            if self._depth == 0:
                start = self._buffer.find("{")
                if start < 0:
                    self.stats.garbage_bytes += len(self._buffer.strip())
                    self._buffer = ""
                    self._scan = 0
                    return
                if start:
                    self.stats.garbage_bytes += len(self._buffer[:start].strip())
                    self._buffer = self._buffer[start:]
                self._scan = 0
            end = self._find_end()
            if end is None:
                if len(self._buffer) > self.max_object_bytes:
                    self._start_discarding()
                return
            raw, self._buffer = self._buffer[:end], self._buffer[end:]
            self._scan = 0
            if self._discarding:
                self._discarding = False
                continue
            if len(raw) > self.max_object_bytes:
                self.stats.oversized += 1
                continue
            try:
                message = json.loads(raw)
            except ValueError:
                self.stats.malformed += 1
                continue
            if not isinstance(message, dict):
                self.stats.malformed += 1
                continue
            yield message

    def _find_end(self) -> int | None:
        """Index just past the closing brace of the current object, or None if incomplete."""
        for match in _TOKEN.finditer(self._buffer, self._scan):
            token = match.group()
            if token == '"':  # unterminated string: rescan it when more bytes arrive
                self._scan = match.start()
                return None
            if token == "{":
                self._depth += 1
            elif token == "}":
                self._depth -= 1
                if self._depth == 0:
                    return match.end()
        self._scan = len(self._buffer)
        return None

    def _start_discarding(self) -> None:
        """Drop the buffered part of an oversized object but keep tracking its depth."""
        if not self._discarding:
            self.stats.oversized += 1
            self._discarding = True
        # Keep only what depth tracking needs: nothing, or the opening quote of an
        # unterminated string (plus a pending escape), so an endless string cannot grow
        # the buffer either.
        tail = self._buffer[self._scan :]
        if tail.startswith('"'):
            backslashes = len(tail) - len(tail.rstrip("\\"))
            tail = '"' + ("\\" if backslashes % 2 else "")
        self._buffer = tail
        self._scan = 0


def encode(message: dict[str, Any]) -> bytes:
    """One compact JSON object on one line, as the Unity simulator sends it."""
    return (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode()


def get_float(
    message: dict[str, Any],
    key: str,
    default: float | None = None,
    *,
    low: float | None = None,
    high: float | None = None,
) -> float:
    """A finite number from ``message[key]``, sent as a JSON number or a numeric string.

    Values outside ``[low, high]`` are clamped, as the Unity simulator clamps controls.
    Raises ProtocolError naming the key when it is missing or not a finite number.
    """
    if key not in message:
        if default is None:
            raise ProtocolError(f"{message.get('msg_type', '?')}: missing field {key!r}")
        return default
    raw = message[key]
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ProtocolError(f"{message.get('msg_type', '?')}: field {key!r} is not a number: {raw!r:.40}")
    try:
        value = float(raw.replace(",", ".") if isinstance(raw, str) else raw)
    except ValueError:
        raise ProtocolError(
            f"{message.get('msg_type', '?')}: field {key!r} is not a number: {raw!r:.40}"
        ) from None
    if not math.isfinite(value):
        raise ProtocolError(f"{message.get('msg_type', '?')}: field {key!r} is not finite: {raw!r:.40}")
    if low is not None:
        value = max(low, value)
    if high is not None:
        value = min(high, value)
    return value


def get_str(message: dict[str, Any], key: str, default: str | None = None) -> str:
    """A string field (numbers are accepted and formatted, as some clients send them)."""
    raw = message.get(key, default)
    if raw is None:
        raise ProtocolError(f"{message.get('msg_type', '?')}: missing field {key!r}")
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return str(raw)
    raise ProtocolError(f"{message.get('msg_type', '?')}: field {key!r} is not a string: {raw!r:.40}")
