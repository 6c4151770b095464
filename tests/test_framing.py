"""The brace-depth splitter and value coercion shared by the twin and the client."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.hw.donkeysim.framing import JsonObjectSplitter, ProtocolError, encode, get_float, get_str


def test_back_to_back_objects_without_separator() -> None:
    splitter = JsonObjectSplitter()
    assert splitter.feed(b'{"msg_type":"a"}{"msg_type":"b"}') == [{"msg_type": "a"}, {"msg_type": "b"}]


def test_braces_and_escaped_quotes_inside_strings() -> None:
    splitter = JsonObjectSplitter()
    text = '{"msg_type":"car_config","car_name":"}{ \\" {"}'
    assert splitter.feed(text.encode()) == [json.loads(text)]


def test_object_split_byte_by_byte_including_inside_a_string() -> None:
    splitter = JsonObjectSplitter()
    data = b'{"msg_type":"control","car_name":"a}b\\"{c","nested":{"x":"1"}}'
    out = []
    for i in range(len(data)):
        out += splitter.feed(data[i : i + 1])
    assert out == [json.loads(data)]
    assert splitter.pending_bytes == 0


def test_malformed_json_is_counted_and_the_next_object_still_arrives() -> None:
    splitter = JsonObjectSplitter()
    out = splitter.feed(b'{"msg_type": "control", "steering": }{"msg_type":"ok"}')
    assert out == [{"msg_type": "ok"}]
    assert splitter.stats.malformed == 1


def test_garbage_between_objects_is_skipped() -> None:
    splitter = JsonObjectSplitter()
    assert splitter.feed(b'hello ]]] {"msg_type":"ok"}\n\n junk') == [{"msg_type": "ok"}]
    assert splitter.stats.garbage_bytes > 0


def test_oversized_object_is_skipped_without_buffering_it() -> None:
    splitter = JsonObjectSplitter(max_object_bytes=1000)
    splitter.feed(b'{"msg_type":"x","blob":"')
    for _ in range(100):
        splitter.feed(b"a" * 1000)
        assert splitter.pending_bytes < 1100  # memory stays bounded inside an endless string
    out = splitter.feed(b'"}{"msg_type":"after"}')
    assert out == [{"msg_type": "after"}]
    assert splitter.stats.oversized == 1


def test_oversized_nested_object_keeps_depth_tracking() -> None:
    splitter = JsonObjectSplitter(max_object_bytes=200)
    splitter.feed(b'{"a":{"b":{')
    splitter.feed(b'"k":"' + b"}" * 500 + b'"')  # braces inside a string must not end it
    out = splitter.feed(b'}}}{"msg_type":"after"}')
    assert out == [{"msg_type": "after"}]
    assert splitter.stats.oversized == 1


def test_encode_is_one_compact_line() -> None:
    data = encode({"msg_type": "telemetry", "speed": 1.5, "hit": "none"})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert b" " not in data
    with pytest.raises(ValueError):
        encode({"speed": float("nan")})


@pytest.mark.parametrize(("raw", "value"), [("0.5", 0.5), (0.5, 0.5), (1, 1.0), ("-1,5", -1.5), (" 2 ", 2.0)])
def test_numbers_as_strings_or_numbers(raw: object, value: float) -> None:
    assert get_float({"msg_type": "control", "x": raw}, "x") == value


@pytest.mark.parametrize("raw", ["nan", "inf", "fast", None, True, [1], {"a": 1}])
def test_bad_numbers_name_the_field(raw: object) -> None:
    with pytest.raises(ProtocolError, match="'steering'"):
        get_float({"msg_type": "control", "steering": raw}, "steering")


def test_clamping_and_defaults() -> None:
    assert get_float({"t": "7"}, "t", low=-1, high=1) == 1
    assert get_float({}, "t", 0.25) == 0.25
    with pytest.raises(ProtocolError, match="missing"):
        get_float({}, "t")
    assert get_str({"n": 3}, "n") == "3"


objects = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.text(alphabet=st.characters(codec="utf-8"), max_size=12), st.integers(), st.booleans(),
              st.lists(st.integers(), max_size=3)),
    max_size=4,
).map(lambda d: {"msg_type": "m", **d})


@settings(max_examples=200, deadline=None)
@given(st.lists(objects, min_size=1, max_size=6), st.lists(st.integers(1, 17), min_size=1, max_size=50),
       st.booleans())
def test_any_chunking_yields_the_same_objects(messages: list[dict], cuts: list[int], newline: bool) -> None:
    stream = ("\n" if newline else "").join(json.dumps(m) for m in messages).encode()
    splitter = JsonObjectSplitter()
    out: list[dict] = []
    position, i = 0, 0
    while position < len(stream):
        size = cuts[i % len(cuts)]
        out += splitter.feed(stream[position : position + size])
        position += size
        i += 1
    assert out == messages
