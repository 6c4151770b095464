"""Local control from the car's own shell: ``donkey-agent estop`` and ``donkey-agent faults``.

``estop`` signals the running agent (SIGUSR1, the pid from its safety state); the agent latches
an e-stop from the ``signal`` source, persisted like any other. ``faults`` shows the latched
faults kept across restarts, and clears them only while no agent runs on this state (a running
agent clears through its fleet link's ``clear_fault``, which keeps the e-stop hold rules).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from agent.config import AgentConfig
from agent.service.state import SafetyState, StateLockedError, state_directory


def _agent_pid(state: SafetyState) -> int | None:
    """The pid of the agent holding this state, if it runs (and is a donkey-agent)."""
    pid = state.load().run.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"donkey-agent" in cmdline or b"agent.cli" in cmdline else None


SYSTEM_STATE = Path("/var/lib/donkey-agent")  # the shipped unit's StateDirectory=


def find_state(config: AgentConfig) -> SafetyState:
    """This config's state; from a shell (no $STATE_DIRECTORY), the service's own when that is the one in use."""
    state = SafetyState(state_directory(config))
    system = SafetyState(SYSTEM_STATE)
    if config.state.directory is None and not state.path.exists() and system.path.exists():
        return system
    return state


def estop(config: AgentConfig) -> tuple[int, str]:
    state = find_state(config)
    pid = _agent_pid(state)
    if pid is None:
        return 1, f"donkey-agent estop: no running agent found for {state.directory}"
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as exc:
        return 1, f"donkey-agent estop: cannot signal pid {pid}: {exc.strerror}"
    return 0, f"e-stop sent to donkey-agent (pid {pid}); it stays latched until clear_fault, across restarts"


def faults(config: AgentConfig, action: str, names: list[str]) -> tuple[int, str]:
    state = find_state(config)
    if action == "show":
        saved = state.load()
        if saved.problem:
            return 1, f"unreadable: {saved.problem} (the agent will start held)"
        return 0, json.dumps({"state": str(state.path), "latched": saved.latched, "run": saved.run}, indent=2)
    try:
        state.lock()
    except StateLockedError:
        return 1, ("donkey-agent faults clear: the agent is running; clear faults through the fleet "
                   "(cmd/clear_fault) or stop it first")
    except OSError as exc:
        return 1, f"donkey-agent faults clear: {state.directory}: {exc.strerror or exc}"
    try:
        cleared = state.clear(names or None)
    except OSError as exc:
        return 1, f"donkey-agent faults clear: {exc}"
    finally:
        state.unlock()
    return 0, f"cleared: {', '.join(cleared) or 'nothing latched'}"
