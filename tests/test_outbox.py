"""The durable event outbox: order, acknowledgement, bounds, and surviving a restart."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from agent.telemetry.outbox import Outbox


def test_order_ack_and_idempotent_add(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    for i in range(5):
        box.add(f"e{i}", {"n": i})
    box.add("e2", {"n": 99})  # the same id again changes nothing
    assert [e.id for e in box.pending()] == ["e0", "e1", "e2", "e3", "e4"]
    assert box.pending()[2].payload == {"n": 2}
    box.acknowledge("e0")
    box.acknowledge("e3")
    assert [e.id for e in box.pending()] == ["e1", "e2", "e4"]
    assert [e.id for e in box.pending(limit=2)] == ["e1", "e2"]


def test_bounds_drop_the_oldest_and_count(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_events=3, max_age_s=100)
    for i in range(5):
        box.add(f"e{i}", {"n": i}, now=1000.0 + i)
    assert [e.id for e in box.pending()] == ["e2", "e3", "e4"]
    assert box.dropped == 2
    box.add("late", {}, now=1103.5)  # e0..e3 are older than 100 s now
    assert [e.id for e in box.pending()] == ["e4", "late"]
    assert box.dropped == 2 + 2


def test_a_killed_process_loses_no_committed_event(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from agent.telemetry.outbox import Outbox
        box = Outbox({str(tmp_path / "outbox.db")!r})
        for i in range(50):
            box.add(f"e{{i}}", {{"n": i}})
        os.kill(os.getpid(), 9)
    """)
    subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    box = Outbox(tmp_path / "outbox.db")
    assert [e.payload["n"] for e in box.pending()] == list(range(50))
