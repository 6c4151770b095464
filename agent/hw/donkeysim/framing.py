"""Framing and value coercion for the Donkey simulator protocol.

The Unity simulator cuts inbound JSON objects by brace depth (no separator needed, so
back-to-back ``}{`` is legal and gym-donkeycar relies on it) and terminates every outbound
object with ``\\n`` (gym-donkeycar waits for ``}\\n``). Numbers travel as JSON strings from
clients and as JSON numbers from the simulator; both sides here accept either.

The splitter is the first code that touches bytes from the network, so it must stay cheap
and bounded whatever arrives: it looks at each byte a bounded number of times, all within
the read that brought it (its state survives between reads, so nothing is rescanned), jumps
over strings and plain values with compiled regular expressions instead of a Python loop
per byte, never buffers more than one object of at most ``max_object_bytes``, never
hands an object nested deeper than ``max_depth`` to ``json.loads`` (whose recursion a
hostile peer could otherwise exhaust), and falls back into step at the next newline after
garbage: JSON forbids a raw newline inside a string, so one there proves a cut-off message.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import AgentError

DEFAULT_MAX_OBJECT_BYTES = 64 * 1024
DEFAULT_MAX_DEPTH = 64  # objects and arrays together, outside strings; a protocol message needs ~3

_QUOTE, _NEWLINE = ord('"'), ord("\n")
_OPENERS = frozenset(b"{[")
_WHITESPACE = b" \t\r\n"

# Inside an object, outside strings: everything that cannot change the depth or end the
# object, complete string literals included, in one possessive (never backtracking) match.
# It stops at a bracket, at a quote that opens a string not complete in this chunk (or one
# broken by a raw newline), at the end of the data and, in newline-terminated mode, at a
# newline. A normal telemetry message therefore costs a handful of matches, not one per byte.
_SKIP_ANY = re.compile(rb'(?:[^"\[\]{}]++|"(?:[^"\\\n]++|\\[^\n])*+")*+')
_SKIP_LINE = re.compile(rb'(?:[^"\[\]{}\n]++|"(?:[^"\\\n]++|\\[^\n])*+")*+')
# The rest of a string body: stops at the closing quote, a raw newline, a backslash that
# escapes a newline or ends the chunk, or the end of the data.
_STRING_BODY = re.compile(rb'(?:[^"\\\n]++|\\[^\n])*+')
_OPEN_RUN = re.compile(rb"[\[{]+")
_CLOSE_RUN = re.compile(rb"[\]}]+")
# From a bracket to the next quote (and newline, in newline-terminated mode): a stretch where
# only brackets change the state. A long one (``[],[],[]...``) is measured with numpy in one
# pass rather than a Python step per bracket run.
_PLAIN_ANY = re.compile(rb'[^"]*+')
_PLAIN_LINE = re.compile(rb'[^"\n]*+')
_BULK_MIN = 64  # bytes; shorter stretches (the end of every normal message) are walked
_DELTA = np.zeros(256, dtype=np.int8)
_DELTA[list(b"{[")] = 1
_DELTA[list(b"}]")] = -1


def _end(pattern: re.Pattern[bytes], chunk: bytes, pos: int) -> int:
    """Where a match of ``pattern`` at ``pos`` ends (``pos`` if it does not match)."""
    match = pattern.match(chunk, pos)
    return match.end() if match is not None else pos


class ProtocolError(AgentError, ValueError):
    """A message that is well-formed JSON but not a valid protocol message."""


@dataclass
class FramingStats:
    """What the splitter threw away, so a server can log each kind once per peer."""

    malformed: int = 0  # complete objects that were not valid JSON objects
    oversized: int = 0  # objects longer than the cap, discarded unread
    too_deep: int = 0  # objects nested deeper than the cap, discarded without parsing
    garbage_bytes: int = 0  # non-whitespace bytes outside any object
    resyncs: int = 0  # objects cut off by a newline (a broken string or an unfinished line), dropped

    def as_dict(self) -> dict[str, int]:
        return {"malformed": self.malformed, "oversized": self.oversized, "too_deep": self.too_deep,
                "garbage_bytes": self.garbage_bytes, "resyncs": self.resyncs}


class JsonObjectSplitter:
    """Incrementally splits a byte stream into JSON objects by brace depth, in linear time.

    ``feed()`` returns the complete objects found so far; the scan state (depth, inside a
    string, a pending escape) is kept, so nothing is rescanned on a later read, and a UTF-8
    character or an escape split across reads is fine. Braces inside strings are ignored. An object longer
    than ``max_object_bytes`` or nested deeper than ``max_depth`` (``{`` and ``[`` counted
    together) is skipped without being buffered; invalid JSON is counted and skipped; a raw
    newline inside a string drops the broken object and scanning restarts after it.

    ``newline_terminated=True`` is for the simulator -> client direction, where every object
    ends with a newline: a newline inside an unfinished object is then a hard boundary too,
    so garbage that leaves the depth wrong costs at most the rest of its line. The server
    side keeps the default: clients (gym-donkeycar) send ``}{`` with no newline, and the
    Unity simulator accepts objects that span lines.
    """

    def __init__(self, max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES, *, max_depth: int = DEFAULT_MAX_DEPTH,
                 newline_terminated: bool = False) -> None:
        self.max_object_bytes = max_object_bytes
        self.max_depth = max_depth
        self.newline_terminated = newline_terminated
        self.stats = FramingStats()
        self._skip = _SKIP_LINE if newline_terminated else _SKIP_ANY
        self._plain = _PLAIN_LINE if newline_terminated else _PLAIN_ANY
        self._depth = 0  # 0: between objects
        self._in_string = False
        self._escape = False  # the previous chunk ended with a backslash inside a string
        self._discarding = False  # inside an oversized or too deep object: drop it, keep the state
        self._held = bytearray()  # the current object's bytes from earlier chunks

    @property
    def pending_bytes(self) -> int:
        """Bytes held for an object that has not closed yet."""
        return len(self._held)

    def feed(self, data: bytes | str) -> list[dict[str, Any]]:
        """Scan ``data`` (never to be rescanned); return every object it completes, in order."""
        chunk = data.encode() if isinstance(data, str) else bytes(data)
        out: list[dict[str, Any]] = []
        pos, end = 0, len(chunk)
        start = 0  # where the current object begins in this chunk
        while pos < end:
            if self._depth == 0:
                start = self._find_object(chunk, pos)
                pos = start + 1
                continue
            if self._discarding and self.newline_terminated:
                pos = self._skip_line(chunk, pos)
                continue
            if self._in_string:
                pos = self._scan_string(chunk, pos)
                if self._depth == 0:  # the string was cut off: resynchronised after the newline
                    continue
            else:
                pos, closed = self._scan_structure(chunk, pos)
                if closed:
                    message = self._complete(chunk, start, pos)
                    if message is not None:
                        out.append(message)
        if self._depth and not self._discarding:
            self._hold(chunk[start:])
        return out

    # -- states ------------------------------------------------------------------------------
    def _find_object(self, chunk: bytes, pos: int) -> int:
        """Skip to the next ``{``, counting what lies before it as garbage; start an object there.

        Returns the index of that ``{`` (or of the end of the chunk when there is none).
        """
        brace = chunk.find(b"{", pos)
        stop = len(chunk) if brace < 0 else brace
        if stop > pos:
            self.stats.garbage_bytes += len(chunk[pos:stop].translate(None, _WHITESPACE))
        if brace < 0:
            return stop
        self._depth, self._in_string, self._escape = 1, False, False
        self._discarding = False
        self._held.clear()
        return brace

    def _skip_line(self, chunk: bytes, pos: int) -> int:
        """Newline-terminated mode, dropping an object: everything up to the newline goes."""
        newline = chunk.find(b"\n", pos)
        if newline < 0:
            return len(chunk)
        self._reset()
        return newline + 1

    def _scan_string(self, chunk: bytes, pos: int) -> int:
        """Continue a string literal; returns where scanning goes on."""
        end = len(chunk)
        if self._escape:  # the escaped byte is the first one of this chunk
            self._escape = False
            if chunk[pos] == _NEWLINE:
                return self._resync(pos + 1)
            pos += 1
        pos = _end(_STRING_BODY, chunk, pos)
        if pos == end:
            return pos
        byte = chunk[pos]
        if byte == _QUOTE:
            self._in_string = False
            return pos + 1
        if byte == _NEWLINE:
            return self._resync(pos + 1)
        # A backslash: it ends the chunk (the escape waits for the next one) or escapes a newline.
        if pos + 1 == end:
            self._escape = True
            return end
        return self._resync(pos + 2)

    def _scan_structure(self, chunk: bytes, pos: int) -> tuple[int, bool]:
        """Outside strings, inside an object: returns (where to go on, whether the object closed)."""
        pos = _end(self._skip, chunk, pos)
        if pos == len(chunk):
            return pos, False
        byte = chunk[pos]
        if byte == _QUOTE:
            self._in_string = True
            return pos + 1, False
        if byte == _NEWLINE:  # only stops here in newline-terminated mode
            return self._resync(pos + 1), False
        stretch = _end(self._plain, chunk, pos)
        if stretch - pos >= _BULK_MIN:
            return self._scan_brackets(chunk, pos, stretch)
        if byte in _OPENERS:
            run = _end(_OPEN_RUN, chunk, pos)
            self._depth += run - pos
            if self._depth > self.max_depth and not self._discarding:
                self.stats.too_deep += 1
                self._discard()
            return run, False
        run = _end(_CLOSE_RUN, chunk, pos)
        if run - pos < self._depth:
            self._depth -= run - pos
            return run, False
        close = pos + self._depth  # just past the bracket that brings the depth to zero
        self._depth = 0
        return close, True

    def _scan_brackets(self, chunk: bytes, pos: int, stop: int) -> tuple[int, bool]:
        """The depth over ``chunk[pos:stop]`` (no strings in it) at once: up to the first event.

        The events are the object closing (depth 0) and, unless it is already being dropped,
        the depth going over the cap.
        """
        levels = np.cumsum(_DELTA[np.frombuffer(chunk, np.uint8, stop - pos, pos)], dtype=np.int64)
        levels += self._depth
        closed = levels <= 0
        events = closed if self._discarding else closed | (levels > self.max_depth)
        first = int(events.argmax())
        if not events[first]:
            self._depth = int(levels[-1])
            return stop, False
        if closed[first]:
            self._depth = 0
            return pos + first + 1, True
        self._depth = int(levels[first])
        self.stats.too_deep += 1
        self._discard()
        return pos + first + 1, False

    # -- transitions -------------------------------------------------------------------------
    def _complete(self, chunk: bytes, start: int, stop: int) -> dict[str, Any] | None:
        """An object closed at ``stop``: parse it unless it was being discarded or is too big."""
        if self._discarding:
            self._reset()
            return None
        if len(self._held) + stop - start > self.max_object_bytes:  # it may have arrived whole in one chunk
            self.stats.oversized += 1
            self._reset()
            return None
        if self._held:
            self._held += chunk[start:stop]
            raw: bytes | bytearray = self._held
            self._held = bytearray()  # hand the buffer over to the parser; the next object gets a new one
        else:
            raw = chunk[start:stop]
        self._reset()
        return self._parse(raw)

    def _parse(self, raw: bytes | bytearray) -> dict[str, Any] | None:
        try:
            # Invalid UTF-8 is replaced, as the Unity simulator's decoder does; the depth cap
            # makes RecursionError unlikely, but it must never escape to the reader thread.
            message = json.loads(raw.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            self.stats.malformed += 1
            return None
        if not isinstance(message, dict):
            self.stats.malformed += 1
            return None
        return message

    def _hold(self, tail: bytes) -> None:
        """Keep an unfinished object's bytes for the next feed, or start discarding it if too big."""
        if len(self._held) + len(tail) > self.max_object_bytes:
            self.stats.oversized += 1
            self._discard()
        elif tail:
            self._held += tail

    def _discard(self) -> None:
        self._discarding = True
        self._held.clear()

    def _resync(self, pos: int) -> int:
        """A newline cut the current object off: drop it and start afresh at ``pos``."""
        if not self._discarding:
            self.stats.resyncs += 1
        self._reset()
        return pos

    def _reset(self) -> None:
        self._depth, self._in_string, self._escape = 0, False, False
        self._discarding = False
        self._held.clear()


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
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
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
