"""The safety state that survives a restart, and the log rate limit: pure parts, tested directly."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from agent.core.faults import Fault
from agent.service.logs import RateLimit
from agent.service.state import SafetyState, SavedState, StateKeeper, StateLockedError, restored_faults


def test_latched_faults_round_trip_and_restore_with_their_reason(tmp_path: Path) -> None:
    state = SafetyState(tmp_path)
    state.save({"estop": "e-stop from mqtt: stop"}, {"pid": 1, "running": False, "driving": False})
    saved = state.load()
    assert saved.latched == {"estop": "e-stop from mqtt: stop"} and saved.problem == ""
    assert restored_faults(saved, after_crash="hold") == {
        Fault.ESTOP: "latched before the restart: e-stop from mqtt: stop"}
    assert list(tmp_path.iterdir()) == [tmp_path / "safety.json"]  # no temporary file left
    detail = "latched before the restart: e-stop from mqtt: stop"
    again = SavedState(latched={"estop": detail})  # a second restart does not say it twice
    assert restored_faults(again, after_crash="hold")[Fault.ESTOP] == detail


@pytest.mark.parametrize("content", ["{not json", "[]", '{"latched": 3}', "\x00\x01"])
def test_an_unreadable_state_holds_rather_than_forgets(tmp_path: Path, content: str) -> None:
    (tmp_path / "safety.json").write_text(content)
    saved = SafetyState(tmp_path).load()
    assert saved.problem
    assert Fault.UNCLEAN_EXIT in restored_faults(saved, after_crash="resume")  # whatever after_crash says


def test_unclean_exit_only_after_a_crash_while_driving() -> None:
    crashed = SavedState(run={"pid": 7, "running": True, "driving": True, "started": 0})
    assert Fault.UNCLEAN_EXIT in restored_faults(crashed, after_crash="hold")
    assert restored_faults(crashed, after_crash="resume") == {}
    parked = SavedState(run={"pid": 7, "running": True, "driving": False})
    assert restored_faults(parked, after_crash="hold") == {}
    clean = SavedState(run={"pid": 7, "running": False, "driving": True})
    assert restored_faults(clean, after_crash="hold") == {}
    unknown = SavedState(latched={"meteor_strike": "?"})
    assert Fault.UNCLEAN_EXIT in restored_faults(unknown, after_crash="resume")  # a fault we do not know: held


def test_the_keeper_writes_only_changes_and_remembers_driving(tmp_path: Path) -> None:
    state = SafetyState(tmp_path)
    keeper = StateKeeper(state)
    keeper.running = True
    keeper.update({}, True, 10.0)
    first = (tmp_path / "safety.json").stat().st_mtime_ns
    keeper.update({}, True, 10.1)
    assert (tmp_path / "safety.json").stat().st_mtime_ns == first  # nothing changed, nothing written
    keeper.update({}, False, 11.0)  # stopped a second ago: still "driving" for a crash
    assert state.load().run["driving"] is True
    keeper.update({}, False, 12.5)
    assert state.load().run["driving"] is False
    keeper.update({"estop": "x"}, False, 13.0)
    assert state.load().latched == {"estop": "x"} and state.load().run["pid"] == os.getpid()


def test_a_state_that_cannot_be_written_is_counted_not_raised(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    keeper = StateKeeper(SafetyState(blocked))  # its directory is a file
    keeper.update({"estop": "x"}, False, 0.0)
    assert keeper.failures == 1


def test_one_agent_per_state_directory(tmp_path: Path) -> None:
    first, second = SafetyState(tmp_path), SafetyState(tmp_path)
    first.lock()
    with pytest.raises(StateLockedError, match="another donkey-agent is running"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_clear_removes_latched_faults_and_acknowledges_a_crash(tmp_path: Path) -> None:
    state = SafetyState(tmp_path)
    state.save({"estop": "a", "actuator_failure": "b"}, {"running": True, "driving": True})
    assert state.clear(["estop"]) == ["estop"]
    assert state.load().latched == {"actuator_failure": "b"} and state.load().run["running"] is True
    assert state.clear(None) == ["actuator_failure"]
    saved = state.load()
    assert saved.latched == {} and restored_faults(saved, after_crash="hold") == {}
    assert json.loads((tmp_path / "safety.json").read_text())["version"] == 1


def test_log_rate_limit_per_template_with_a_count_of_what_was_suppressed() -> None:
    now = [0.0]
    limit = RateLimit(burst=3, per_s=1.0, clock=lambda: now[0])

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("donkey-agent", logging.WARNING, __file__, 1, msg, args, None)

    passed = [limit.filter(record("command %s refused: %s", "set_mode", f"#{i}")) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(record("%s: %s", "fault", "stale_frame"))  # another template still gets through
    now[0] += 1.0
    resumed = record("command %s refused: %s", "set_mode", "#10")
    assert limit.filter(resumed) and "[7 similar lines suppressed]" in resumed.getMessage()
