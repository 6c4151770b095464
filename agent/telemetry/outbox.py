"""A durable event outbox: SQLite in WAL mode, deleted only after the broker acknowledged.

Events are written here first and published from here, in order; a row goes away only on
PUBACK. The outbox survives an agent restart and a broker outage, and is bounded by count
and by age: beyond either, the oldest events are dropped and counted (never the newest:
what just happened matters most to an operator).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class PendingEvent:
    seq: int
    id: str
    payload: dict[str, Any]


class Outbox:
    """Not thread-safe: one owner (the telemetry service) uses it from one thread."""

    def __init__(self, path: Path | str, *, max_events: int = 10_000, max_age_s: float = 7 * 24 * 3600) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        self._db.executescript(SCHEMA)

    @property
    def dropped(self) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def _count_dropped(self, count: int) -> None:
        if count:
            self._db.execute("INSERT INTO counters VALUES ('dropped', ?) ON CONFLICT(name) DO UPDATE "
                             "SET value = value + excluded.value", (count,))

    def add(self, event_id: str, payload: dict[str, Any], *, now: float | None = None) -> None:
        """Store an event (idempotent on ``event_id``), then enforce the bounds."""
        now = time.time() if now is None else now
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO events (id, created, payload) VALUES (?, ?, ?)",
                             (event_id, now, json.dumps(payload, separators=(",", ":"))))
            self._enforce(now)

    def _enforce(self, now: float) -> None:
        expired = self._db.execute("DELETE FROM events WHERE created < ?", (now - self.max_age_s,)).rowcount
        excess = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0] - self.max_events
        overflow = 0
        if excess > 0:
            overflow = self._db.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)", (excess,)).rowcount
        self._count_dropped(expired + overflow)

    def pending(self, limit: int = 100) -> list[PendingEvent]:
        rows = self._db.execute("SELECT seq, id, payload FROM events ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [PendingEvent(seq, event_id, json.loads(payload)) for seq, event_id, payload in rows]

    def acknowledge(self, event_id: str) -> None:
        self._db.execute("DELETE FROM events WHERE id = ?", (event_id,))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        self._db.close()
