"""Command validation: every invalid command is refused with a reason, nothing crashes (fuzzed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.telemetry.commands import NAMES, SeenIds, parse

NOW = 1_800_000_000.0


def run(name: str, message: object, *, latched: bool = False, seen: SeenIds | None = None):
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return parse(name, payload, now=NOW, seen=seen or SeenIds(), latched=latched, max_throttle=0.5)


def test_valid_commands() -> None:
    assert run("estop", {"id": "a1"}).error == ""
    assert run("set_mode", {"id": "a2", "value": "local", "exp": NOW + 5}).value == "local"
    assert run("set_max_throttle", {"id": "a3", "value": 0.3}).value == 0.3
    assert run("record", {"id": "a4", "value": "start"}).error == ""
    assert run("ping", {"id": "a5"}).error == ""
    assert run("clear_fault", {"id": "a6", "value": "estop"}).error == ""


@pytest.mark.parametrize(("name", "message", "reason"), [
    ("set_mode", b"{not json", "not JSON"),
    ("set_mode", [1, 2], "not a JSON object"),
    ("set_mode", {"value": "local"}, "missing or invalid id"),
    ("set_mode", {"id": "has space", "value": "local"}, "missing or invalid id"),
    ("launch", {"id": "x"}, "unknown command 'launch'"),
    ("set_mode", {"id": "x", "value": "turbo"}, "one of user, local_angle, local"),
    ("set_max_throttle", {"id": "x", "value": 1.5}, "[0, 1]"),
    ("set_max_throttle", {"id": "x", "value": True}, "[0, 1]"),
    ("set_mode", {"id": "x", "value": "local", "exp": NOW - 3}, "expired 3.0 s ago"),
    ("set_mode", {"id": "x", "value": "local", "exp": "soon"}, "exp must be a number"),
    ("estop", {"id": "x", "value": 1}, "takes no value"),
    ("record", {"id": "x", "value": "pause"}, "'start' or 'stop'"),
])
def test_invalid_commands_are_refused_with_a_reason(name: str, message: object, reason: str) -> None:
    parsed = run(name, message)
    assert reason in parsed.error


def test_duplicates_and_latched_faults() -> None:
    seen = SeenIds()
    assert run("set_mode", {"id": "d", "value": "user"}, seen=seen).error == ""
    duplicate = run("set_mode", {"id": "d", "value": "user"}, seen=seen)
    assert duplicate.error == "duplicate id 'd'" and duplicate.id is None  # no answer over the original
    assert "latched" in run("set_mode", {"id": "m", "value": "local"}, latched=True).error
    assert run("set_mode", {"id": "u", "value": "user"}, latched=True).error == ""  # stopping is always fine
    assert "latched" in run("set_max_throttle", {"id": "t", "value": 0.9}, latched=True).error
    assert run("set_max_throttle", {"id": "t2", "value": 0.2}, latched=True).error == ""  # lowering is fine
    assert run("estop", {"id": "e"}, latched=True).error == ""
    assert run("clear_fault", {"id": "c"}, latched=True).error == ""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from([*NAMES, "x", ""]), payload=st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"id": st.text(max_size=70)}, optional={"exp": json_values, "value": json_values})
    .map(lambda v: json.dumps(v).encode()),
))
def test_fuzzed_payloads_never_crash_and_invalid_ones_never_pass(name: str, payload: bytes) -> None:
    parsed = parse(name, payload, now=NOW, seen=SeenIds(), latched=False, max_throttle=0.5)
    if not parsed.error:  # whatever passed is a well-formed command
        assert parsed.name in NAMES and parsed.id is not None
        message = json.loads(payload)
        assert message["id"] == parsed.id
