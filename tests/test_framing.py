"""The brace-depth splitter and value coercion shared by the twin and the client."""

from __future__ import annotations

import json
import time

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


# -- resynchronisation, caps and linear time ----------------------------------------------------
def feed_in_chunks(splitter: JsonObjectSplitter, data: bytes, cuts: list[int]) -> list[dict]:
    out: list[dict] = []
    position, i = 0, 0
    while position < len(data):
        size = cuts[i % len(cuts)]
        out += splitter.feed(data[position : position + size])
        position += size
        i += 1
    return out


@pytest.mark.parametrize("newline_terminated", [False, True])
def test_a_raw_newline_inside_a_string_drops_the_cut_object(newline_terminated: bool) -> None:
    splitter = JsonObjectSplitter(newline_terminated=newline_terminated)
    # Half a message whose string never closes, then good ones: JSON forbids a raw newline in
    # a string, so the newline proves the cut, and scanning restarts right after it.
    out = splitter.feed(b'{"msg_type":"telemetry","image":"abc\n{"msg_type":"a"}\n{"msg_type":"b"}\n')
    assert out == [{"msg_type": "a"}, {"msg_type": "b"}]
    assert splitter.stats.resyncs == 1
    assert splitter.pending_bytes == 0


@pytest.mark.parametrize("newline_terminated", [False, True])
def test_an_escaped_newline_is_a_cut_too_and_escapes_survive_any_split(newline_terminated: bool) -> None:
    splitter = JsonObjectSplitter(newline_terminated=newline_terminated)
    assert splitter.feed(b'{"a":"x\\\n{"msg_type":"ok"}') == [{"msg_type": "ok"}]
    assert splitter.stats.resyncs == 1
    data = b'{"msg_type":"m","s":"a\\\\\\"}{\\\\","t":"\\u00e9"}\n'
    for cut in range(1, len(data)):
        if cut < len(data) - 1:  # everything but the closing brace: nothing complete yet
            assert JsonObjectSplitter(newline_terminated=newline_terminated).feed(data[:cut]) == []
        fresh = JsonObjectSplitter(newline_terminated=newline_terminated)
        assert fresh.feed(data[:cut]) + fresh.feed(data[cut:]) == [json.loads(data)]


def test_a_utf8_character_split_across_reads_is_decoded_whole() -> None:
    data = json.dumps({"msg_type": "m", "name": "voiture é ✓ 🚗"}, ensure_ascii=False).encode() + b"\n"
    splitter = JsonObjectSplitter(newline_terminated=True)
    out = [m for byte in data for m in splitter.feed(bytes([byte]))]
    assert out == [json.loads(data)]


def test_newline_terminated_mode_recovers_from_a_wrong_depth_at_the_next_line() -> None:
    splitter = JsonObjectSplitter(newline_terminated=True)
    out = splitter.feed(b'{"msg_type":"x","a":[[[{{\n{"msg_type":"ok"}\n')
    assert out == [{"msg_type": "ok"}]
    assert splitter.stats.resyncs == 1


def test_the_server_side_still_accepts_objects_across_lines() -> None:
    splitter = JsonObjectSplitter()
    assert splitter.feed(b'{\n  "msg_type": "control",\n  "steering": "0.1"\n}{"msg_type":"b"}') == [
        {"msg_type": "control", "steering": "0.1"}, {"msg_type": "b"}]


@pytest.mark.parametrize("newline_terminated", [False, True])
def test_nesting_is_capped_counting_objects_and_arrays(newline_terminated: bool) -> None:
    splitter = JsonObjectSplitter(max_depth=64, newline_terminated=newline_terminated)
    at_cap = b'{"a":' + b'[{"b":' * 31 + b"[1]" + b"}]" * 31 + b',"msg_type":"m"}\n'  # depth 64
    over = b'{"a":' + b'[{"b":' * 32 + b"1" + b"}]" * 32 + b"}\n"  # depth 65
    assert splitter.feed(at_cap) == [json.loads(at_cap)]
    assert splitter.feed(over + b'{"msg_type":"after"}\n') == [{"msg_type": "after"}]
    assert splitter.stats.too_deep == 1
    assert splitter.stats.malformed == 0


@pytest.mark.parametrize("newline_terminated", [False, True])
def test_100k_nested_brackets_never_reach_json_loads(newline_terminated: bool, monkeypatch) -> None:
    from agent.hw.donkeysim import framing

    parsed: list[int] = []
    real_loads = framing.json.loads
    monkeypatch.setattr(framing.json, "loads", lambda text: parsed.append(len(text)) or real_loads(text))
    splitter = JsonObjectSplitter(max_object_bytes=1 << 20, newline_terminated=newline_terminated)
    deep = b'{"msg_type":"telemetry","deep":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    out = feed_in_chunks(splitter, deep + b'{"msg_type":"ok"}\n', [4096])
    assert out == [{"msg_type": "ok"}]
    assert splitter.stats.too_deep == 1
    assert max(parsed) < 100


def test_recursion_error_in_json_loads_is_contained(monkeypatch) -> None:
    from agent.hw.donkeysim import framing

    def explode(text: str) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(framing.json, "loads", explode)
    splitter = JsonObjectSplitter()
    assert splitter.feed(b'{"msg_type":"m"}') == []
    assert splitter.stats.malformed == 1


def test_oversized_object_in_newline_mode_is_skipped_to_the_next_line() -> None:
    splitter = JsonObjectSplitter(max_object_bytes=1000, newline_terminated=True)
    splitter.feed(b'{"msg_type":"x","blob":"')
    for _ in range(100):
        splitter.feed(b"a{[" * 1000)
        assert splitter.pending_bytes < 1100
    assert splitter.feed(b'"}\n{"msg_type":"after"}\n') == [{"msg_type": "after"}]
    assert splitter.stats.oversized == 1


def test_an_oversized_object_arriving_whole_is_not_parsed() -> None:
    splitter = JsonObjectSplitter(max_object_bytes=100)
    assert splitter.feed(json.dumps({"msg_type": "m", "pad": "x" * 200}).encode() + b'{"msg_type":"ok"}') == [
        {"msg_type": "ok"}]
    assert splitter.stats.oversized == 1


def test_counters() -> None:
    splitter = JsonObjectSplitter(newline_terminated=True)
    splitter.feed(b'junk \n{"msg_type": }\n[1]\n{"a":"\n')
    assert splitter.stats.as_dict() == {"malformed": 1, "oversized": 0, "too_deep": 0, "garbage_bytes": 7,
                                        "resyncs": 1}


lines = st.lists(objects, min_size=1, max_size=6)
cut_sizes = st.lists(st.integers(1, 300), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(lines, cut_sizes)
def test_any_chunking_of_newline_terminated_messages_in_either_mode(messages: list[dict], cuts: list[int]) -> None:
    stream = b"".join(json.dumps(m, ensure_ascii=False).encode() + b"\n" for m in messages)
    for newline_terminated in (False, True):
        assert feed_in_chunks(JsonObjectSplitter(newline_terminated=newline_terminated), stream, cuts) == messages


def cut_off(message: dict) -> bytes:
    line = json.dumps(message).encode()
    return line[: max(1, len(line) // 2)]


garbage = st.one_of(
    st.binary(max_size=400),
    objects.map(cut_off),  # half a message: often an unterminated string
    st.text(alphabet='{}[]",:\\ ab1', max_size=200).map(str.encode),  # unbalanced braces, stray quotes
    st.integers(65, 3000).map(lambda n: b'{"deep":' + b"[" * n),  # deep nesting, never closed
    st.integers(65, 3000).map(lambda n: b'{"deep":' + b"[" * n + b"]" * n + b"}"),  # deep, closed
)


@settings(max_examples=300, deadline=None)
@given(st.lists(objects, min_size=2, max_size=6), st.data(), garbage, cut_sizes)
def test_garbage_between_lines_costs_at_most_the_next_line(
    messages: list[dict], data: st.DataObject, junk: bytes, cuts: list[int]
) -> None:
    """Every message before the garbage arrives, and every one after the next newline that follows it."""
    at = data.draw(st.integers(0, len(messages) - 1))
    encoded = [json.dumps(m).encode() + b"\n" for m in messages]
    stream = b"".join(encoded[:at]) + junk + b"".join(encoded[at:])
    out = feed_in_chunks(JsonObjectSplitter(newline_terminated=True), stream, cuts)
    assert out[:at] == messages[:at]
    after = messages[at + 1 :]
    if after:
        assert out[-len(after) :] == after


def best_time(data: bytes, chunk: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        splitter = JsonObjectSplitter(max_object_bytes=16 << 20, newline_terminated=True)
        started = time.perf_counter()
        out = feed_in_chunks(splitter, data, [chunk])
        best = min(best, time.perf_counter() - started)
        assert len(out) == 1
    return best


@pytest.mark.parametrize("filler", [b"A", b"\\\"", b"[],"])
def test_time_is_linear_in_the_bytes_fed(filler: bytes) -> None:
    """A 4 MB object in 4 KB reads costs about 4x a 1 MB one (a rescanning splitter: 16x)."""

    def message(size: int) -> bytes:
        body = filler * (size // len(filler))
        if filler == b"[],":
            return b'{"msg_type":"m","a":[' + body + b'1]}\n'
        return b'{"msg_type":"m","a":"' + body + b'"}\n'

    one, four = best_time(message(1 << 20), 4096), best_time(message(4 << 20), 4096)
    assert four / one < 8, f"1 MB: {one:.3f} s, 4 MB: {four:.3f} s"
