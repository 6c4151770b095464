"""What must survive a restart: latched faults and whether the last run ended cleanly.

``safety.json`` in the state directory holds the latched faults (an e-stop, an actuator
failure...) and a run marker: ``running`` is true from READY until a clean stop. At start the
agent re-latches every persisted fault, and after an unclean exit while the car was driving it
also latches ``unclean_exit`` (``drive.after_crash = "hold"``, the default). A file that cannot
be read is treated as the worst case (held), never as "all clear".

Writes are atomic (a temporary file, fsync, rename, fsync of the directory), so a power cut
leaves the old state or the new one. A lock on the directory keeps two agents from sharing
one state (and one car).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.config import AgentConfig
from agent.core.faults import LATCHED, Fault
from agent.errors import AgentError

log = logging.getLogger("donkey-agent.state")

STATE_FILE = "safety.json"
LOCK_FILE = "agent.lock"
VERSION = 1
RESTORED = "latched before the restart: "


class StateLockedError(AgentError, RuntimeError):
    """Another agent holds this state directory."""


def state_directory(config: AgentConfig) -> Path:
    if config.state.directory is not None:
        return config.state.directory
    systemd = os.environ.get("STATE_DIRECTORY")  # StateDirectory=: may list several, colon-separated
    if systemd:
        return Path(systemd.split(":")[0])
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "donkey-agent" / f"{config.telemetry.fleet}-{config.telemetry.car_id}"


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


@dataclass
class SavedState:
    latched: dict[str, str] = field(default_factory=dict)  # fault -> why
    run: dict[str, Any] = field(default_factory=dict)  # pid, boot_id, started, running, driving
    problem: str = ""  # why the file could not be read ("" when it could, or did not exist)


def restored_faults(saved: SavedState, *, after_crash: str) -> dict[Fault, str]:
    """The faults to latch at start, each with a detail that says why (pure)."""
    faults: dict[Fault, str] = {}
    for name, detail in saved.latched.items():
        try:
            fault, why = Fault(name), detail
        except ValueError:
            fault = Fault.UNCLEAN_EXIT  # a fault this version does not know: hold rather than forget it
            why = f"unknown latched fault {name!r}: {detail}"
        if fault in LATCHED:
            faults[fault] = why if why.startswith(RESTORED) else f"{RESTORED}{why}"  # once, however many restarts
    if saved.problem:
        faults[Fault.UNCLEAN_EXIT] = f"the safety state could not be read ({saved.problem}); holding to be safe"
    run = saved.run
    if run.get("running") and run.get("driving") and after_crash == "hold":
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.get("started", 0)))
        again = "" if run.get("boot_id") == boot_id() else " (the machine has rebooted since)"
        faults[Fault.UNCLEAN_EXIT] = (f"the previous run (pid {run.get('pid')}, started {when}) ended without "
                                      f"stopping while the car was driving{again}; clear_fault to drive")
    return faults


class SafetyState:
    """The state file of one car. Not thread-safe: one owner (the daemon's event loop)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self._lock: IO[bytes] | None = None

    def lock(self) -> None:
        """Take the directory for this process, creating it; raises StateLockedError if taken."""
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = (self.directory / LOCK_FILE).open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StateLockedError(f"{self.directory}: another donkey-agent is running with this state directory "
                                   "(one agent per car)") from None
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def load(self) -> SavedState:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return SavedState()
        except (OSError, ValueError) as exc:
            return SavedState(problem=f"{self.path}: {exc}")
        if not isinstance(data, dict) or not isinstance(data.get("latched", {}), dict) \
                or not isinstance(data.get("run", {}), dict):
            return SavedState(problem=f"{self.path}: not a safety state")
        latched = {str(k): str(v.get("detail", "") if isinstance(v, dict) else v)
                   for k, v in data.get("latched", {}).items()}
        return SavedState(latched, dict(data.get("run", {})))

    def save(self, latched: Mapping[str, str], run: Mapping[str, Any]) -> None:
        """Replace the file atomically; raises OSError (the caller counts and retries)."""
        body = {"version": VERSION, "saved": round(time.time(), 3),
                "latched": {name: {"detail": detail} for name, detail in sorted(latched.items())},
                "run": dict(run)}
        tmp = self.path.with_name(f".{STATE_FILE}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as handle:
                handle.write(json.dumps(body, indent=1) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def clear(self, faults: list[str] | None = None) -> list[str]:
        """Remove latched faults (all with None) from a stopped agent's file; returns those removed."""
        saved = self.load()
        if saved.problem:
            raise OSError(saved.problem)
        names = list(saved.latched) if faults is None else [f for f in faults if f in saved.latched]
        latched = {k: v for k, v in saved.latched.items() if k not in names}
        run = dict(saved.run)
        if Fault.UNCLEAN_EXIT.value in names or faults is None:
            run["running"] = False  # the operator has looked at the car: the crash is acknowledged
        self.save(latched, run)
        return names


class StateKeeper:
    """Keeps ``safety.json`` in step with the drive core: called on the daemon's event loop.

    It reads the core's published snapshot, plus e-stop presses the core has not latched yet
    (so a press is durable from the moment it arrives, not a cycle later), and writes only
    when something changed. ``driving`` stays true for ``DRIVING_HOLD_S`` after the car last
    moved, so a crash just after a stop still counts as a crash while driving.
    """

    DRIVING_HOLD_S = 2.0

    def __init__(self, state: SafetyState) -> None:
        self.state = state
        self.run: dict[str, Any] = {"pid": os.getpid(), "boot_id": boot_id(), "started": round(time.time(), 3)}
        self.running = False
        self.failures = 0
        self._driving_until = -1.0
        self._saved: tuple[Any, ...] | None = None

    def update(self, latched: Mapping[str, str], moving: bool, now: float) -> None:
        if moving:
            self._driving_until = now + self.DRIVING_HOLD_S
        driving = self.running and now < self._driving_until
        key = (tuple(sorted(latched.items())), self.running, driving)
        if key == self._saved:
            return
        try:
            self.state.save(latched, {**self.run, "running": self.running, "driving": driving})
        except OSError as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                log.error("cannot save the safety state to %s (%d failures): %s", self.state.path, self.failures, exc)
            return
        self._saved = key
