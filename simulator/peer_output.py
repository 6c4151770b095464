"""A bounded output queue per peer: a peer that does not read loses frames and replies, never the twin's memory.

The queue is the asyncio transport's write buffer, and every message passes one check before
it is written: how much is already waiting. Telemetry frames and answers to requests
(``node_position``, ``protocol_version``, ``scene_names``) are dropped once ``max_backlog``
bytes wait; the twin's own events (the greeting, ``car_loaded``, start-line crossings) have
a little headroom above that, so a slow but reading client does not lose them behind its
frames. A peer therefore holds at most ``max_backlog`` plus headroom plus one message (the
largest a frame can be is set by the camera pixel cap).
Everything dropped is counted by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, Literal

from agent.hw.donkeysim.framing import encode

DEFAULT_MAX_BACKLOG = 256 * 1024  # bytes waiting for a peer before its frames and replies are dropped (~2 s of
# 160x120 frames: deeper would only hold stale ones)
SEND_BUFFER_BYTES = 128 * 1024  # the kernel's share (SO_SNDBUF), fixed so a peer that stops reading shows soon
EVENT_HEADROOM = 64 * 1024  # extra room for the twin's own (small, rare) events

Kind = Literal["frame", "reply", "event"]


class PeerOutput:
    """Writes protocol lines to one peer within a byte budget; counts what it drops."""

    def __init__(self, writer: asyncio.StreamWriter, max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        self.writer = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self.max_backlog = max_backlog
        self.sent = {"frame": 0, "reply": 0, "event": 0}
        self.dropped = {"frame": 0, "reply": 0, "event": 0}
        self.bytes_sent = 0

    @property
    def backlog(self) -> int:
        """Bytes written but not yet taken by the kernel (the peer is not reading fast enough)."""
        transport = self.writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    @property
    def closing(self) -> bool:
        return self.writer.is_closing()

    def room_for(self, kind: Kind) -> bool:
        """Whether a message of this kind is written now: the backlog is under its kind's limit.

        The message's own size is not counted, so the same answer before a frame is rendered and
        after (a frame is never made only to be dropped); a peer holds at most the limit plus one.
        """
        limit = self.max_backlog + (EVENT_HEADROOM if kind == "event" else 0)
        return self.backlog <= limit

    def send(self, message: dict[str, Any], kind: Kind) -> bool:
        return self.send_line(encode(message), kind)

    def send_line(self, line: bytes, kind: Kind) -> bool:
        """Write one encoded line, or count it dropped; True when written."""
        if self.closing:
            return False
        if not self.room_for(kind):
            self.dropped[kind] += 1
            return False
        self.writer.write(line)
        self.sent[kind] += 1
        self.bytes_sent += len(line)
        return True
