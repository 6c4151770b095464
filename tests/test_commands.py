"""Command validation into typed core commands: every invalid command is refused with a reason, nothing
crashes (fuzzed, nesting included), and no value reaches the core unchecked."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.commands import (
    ClearFault,
    CommandError,
    CommandLane,
    Record,
    SetBehavior,
    SetMaxThrottle,
    SetMode,
)
from agent.core.faults import Fault
from agent.telemetry.commands import MAX_DEPTH, NAMES, SeenIds, command_id, nesting_depth, parse

NOW = 1_800_000_000.0
RECEIVED = 1000.0


def run(name: str, message: object, *, seen: SeenIds | None = None, retained: bool = False):
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return parse(name, payload, now=NOW, received=RECEIVED, seen=seen or SeenIds(), retained=retained)


def test_valid_commands_become_typed_core_commands() -> None:
    assert run("estop", {"id": "a1"}).error == ""
    mode = run("set_mode", {"id": "a2", "value": "local", "exp": NOW + 5}).command
    assert isinstance(mode, SetMode) and mode.mode == "local" and mode.id == "a2" and mode.source == "mqtt"
    assert mode.received == RECEIVED and mode.expires == RECEIVED + 2.0  # never later than the answer's timeout
    soon = run("set_mode", {"id": "a2b", "value": "user", "exp": NOW + 0.5}).command
    assert soon is not None and soon.expires == pytest.approx(RECEIVED + 0.5)  # exp is honoured by the core too
    limit = run("set_max_throttle", {"id": "a3", "value": 0.3}).command
    assert isinstance(limit, SetMaxThrottle) and limit.value == 0.3 and type(limit.value) is float
    record = run("record", {"id": "a4", "value": "start"}).command
    assert isinstance(record, Record) and record.on is True
    assert run("ping", {"id": "a5"}).error == ""
    clear = run("clear_fault", {"id": "a6", "value": "estop"}).command
    assert isinstance(clear, ClearFault) and clear.fault is Fault.ESTOP
    everything = run("clear_fault", {"id": "a7"}).command
    assert isinstance(everything, ClearFault) and everything.fault is None


@pytest.mark.parametrize(("name", "message", "reason"), [
    ("set_mode", b"{not json", "not JSON"),
    ("set_mode", [1, 2], "not a JSON object"),
    ("set_mode", {"value": "local"}, "missing or invalid id"),
    ("set_mode", {"id": "has space", "value": "local"}, "missing or invalid id"),
    ("launch", {"id": "x"}, "unknown command 'launch'"),
    ("set_mode", {"id": "x", "value": "turbo"}, "one of user, local_angle, local"),
    ("set_mode", {"id": "x", "value": ["local"]}, "one of user, local_angle, local"),
    ("set_max_throttle", {"id": "x", "value": 1.5}, "[0, 1]"),
    ("set_max_throttle", {"id": "x", "value": True}, "[0, 1]"),
    ("set_max_throttle", {"id": "x", "value": "0.5"}, "[0, 1]"),
    ("set_max_throttle", {"id": "x", "value": None}, "[0, 1]"),
    ("set_mode", {"id": "x", "value": "local", "exp": NOW - 3}, "expired 3.0 s ago"),
    ("set_mode", {"id": "x", "value": "local", "exp": "soon"}, "exp must be a number"),
    ("estop", {"id": "x", "value": 1}, "takes no value"),
    ("record", {"id": "x", "value": "pause"}, "'start' or 'stop'"),
    ("clear_fault", {"id": "x", "value": "everything"}, "unknown fault 'everything'"),
    ("clear_fault", {"id": "x", "value": 3}, "a fault name"),
    ("set_mode", b"[" * 100_000 + b"]" * 100_000, "payload over 4096 bytes"),
    ("set_mode", b'{"id": "x", "value": ' + b"[" * 20 + b"]" * 20 + b"}", f"nested deeper than {MAX_DEPTH}"),
])
def test_invalid_commands_are_refused_with_a_reason(name: str, message: object, reason: str) -> None:
    parsed = run(name, message)
    assert reason in parsed.error and parsed.command is None


def test_retained_commands_are_refused_but_answered() -> None:
    parsed = run("set_max_throttle", {"id": "r1", "value": 1.0}, retained=True)
    assert "retained" in parsed.error and parsed.id == "r1" and parsed.command is None


def test_duplicates_are_not_answered_over_the_original() -> None:
    seen = SeenIds()
    assert run("set_mode", {"id": "d", "value": "user"}, seen=seen).error == ""
    duplicate = run("set_mode", {"id": "d", "value": "user"}, seen=seen)
    assert duplicate.error == "duplicate id 'd'" and duplicate.id is None


def test_nesting_is_measured_outside_strings() -> None:
    assert nesting_depth(b'{"a": "[[[[[[[[[[[[[[[[[["}') == 1
    assert nesting_depth(b'{"a": [[{"b": []}]]}') == 5
    assert nesting_depth(b'{"a": "\\"[[[[[[[[[[[[[[[[[["}') == 1
    assert command_id(b"[" * 3000) is None and command_id(b'{"id": "ok-1"}') == "ok-1"


def test_core_commands_refuse_wrong_types_at_construction() -> None:
    for bad in (True, "0.4", math.nan, math.inf, -0.1, 1.01, None, [0.4]):
        with pytest.raises(CommandError):
            SetMaxThrottle(value=bad)  # type: ignore[arg-type]
    with pytest.raises(CommandError):
        SetMode(mode=1)  # type: ignore[arg-type]
    with pytest.raises(CommandError):
        Record(on="yes")  # type: ignore[arg-type]
    with pytest.raises(CommandError):
        SetBehavior(index=True)  # type: ignore[arg-type]
    with pytest.raises(CommandError):
        ClearFault(fault="nonsense")  # type: ignore[arg-type]
    assert ClearFault(fault="estop").fault is Fault.ESTOP  # type: ignore[arg-type]


def test_a_lane_refuses_instead_of_dropping() -> None:
    now = [0.0]
    lane = CommandLane("mqtt", capacity=3, rate_per_s=2.0, burst=4, clock=lambda: now[0])
    commands = [SetMode(mode="user", id=f"c{i}") for i in range(5)]
    results = [lane.submit(c) for c in commands]
    assert results[:3] == ["", "", ""] and "full" in results[3] and "full" in results[4]
    assert lane.take() is commands[0] and len(lane) == 2  # taking makes room...
    assert lane.submit(commands[3]) == ""  # ...the 4th token of the burst
    assert lane.take() is commands[1]
    assert "rate limit" in lane.submit(commands[4])  # burst used up: the rate limit refuses
    now[0] += 0.5  # one token back at 2/s
    assert lane.submit(commands[4]) == ""
    assert lane.stats() == {"waiting": 3, "refused_full": 2, "refused_rate": 1}
    taken = [lane.take() for _ in range(4)]
    assert [c.id if c else None for c in taken] == ["c2", "c3", "c4", None]  # in order


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
nested = st.integers(min_value=0, max_value=3000).map(lambda n: b'{"id": "n", "value": ' + b"[" * n + b"]" * n + b"}")


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from([*NAMES, "x", ""]), retained=st.booleans(), payload=st.one_of(
    st.binary(max_size=200),
    nested,
    st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"id": st.text(max_size=70)}, optional={"exp": json_values, "value": json_values})
    .map(lambda v: json.dumps(v).encode()),
))
def test_fuzzed_payloads_never_crash_and_invalid_ones_never_pass(name: str, retained: bool, payload: bytes) -> None:
    parsed = parse(name, payload, now=NOW, received=RECEIVED, seen=SeenIds(), retained=retained)
    if not parsed.error:  # whatever passed is a well-formed, typed command, never a retained one
        assert parsed.name in NAMES and parsed.id is not None and not retained
        message = json.loads(payload)
        assert message["id"] == parsed.id
        assert (parsed.command is None) == (name in ("estop", "ping"))
