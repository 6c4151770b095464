"""The policy-ready contract: payloads, the union merge, and the car's PolicySync waiting (pure, no broker).

The bridge side against a real Keylime verifier is in tests/test_keylime_real.py.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading

import pytest

from agent.attest import policy as policies
from agent.attest.policy_sync import (
    PolicyReady,
    PolicySync,
    PolicySyncError,
    merge,
    parse_ready,
    parse_request,
    policy_filter,
    policy_topic,
    ready_topic,
)
from tests.keylime_inproc import keylime_ima

UUID = "d432fbb3-d2f1-4a97-9ef7-75bd81c00001"
MODEL = "/opt/donkey/models/pilot.tflite"
OLD, NEW = "aa" * 32, "bb" * 32


def test_topics():
    assert policy_topic("lab", "car7") == "donkey/lab/car7/attestation/policy"
    assert ready_topic("lab", "car7") == "donkey/lab/car7/attestation/policy/ready"
    assert policy_filter("lab") == "$share/donkey-attest-bridge/donkey/lab/+/attestation/policy"


def test_merge_is_a_union_and_raises_the_release_once():
    fragment = policies.build([], release=4)
    fragment["digests"] = {MODEL: [OLD], "boot_aggregate": ["0" * 64]}
    stamp = datetime.datetime(2030, 1, 2, 3, 4, 5)
    merged, changed = merge(fragment, {MODEL: [NEW, OLD], "/opt/donkey/models/b.tflite": [OLD]}, now=lambda: stamp)
    assert changed and merged["release"] == 5 and merged["meta"]["timestamp"] == str(stamp)
    assert merged["digests"][MODEL] == sorted([OLD, NEW]) and merged["digests"]["boot_aggregate"] == ["0" * 64]
    assert fragment["digests"][MODEL] == [OLD]  # the input is not changed
    again, changed = merge(merged, {MODEL: [NEW]})
    assert not changed and again == merged  # idempotent: nothing to write, same release
    keylime_ima().validate_runtime_policy(merged)  # still Keylime's schema


def test_request_round_trip_and_refusals():
    sent: list[tuple[str, bytes]] = []
    sync = PolicySync(fleet="lab", car="car7", uuid=UUID.upper(), publish=lambda t, p: sent.append((t, p)),
                      new_id=lambda: "req00001")
    assert sync.request({MODEL: [NEW]}) == "req00001"
    topic, payload = sent[0]
    request = parse_request(payload)
    assert topic == "donkey/lab/car7/attestation/policy"
    assert (request.request_id, request.car, request.uuid, dict(request.digests)) == ("req00001", "car7", UUID,
                                                                                       {MODEL: (NEW,)})
    assert json.loads(payload)["version"] == 1
    for bad in ({"models/x": [NEW]}, {MODEL: ["AB" * 32]}, {MODEL: ["ab"]}, {MODEL: []}, {}):
        with pytest.raises(PolicySyncError):
            sync.request(bad)
    for raw in (b"", b"[]", b'{"version": 2}', b'{"version": 1, "request_id": "x", "car": "c", "uuid": "u"}',
                json.dumps({"version": 1, "request_id": "req00001", "car": "c", "uuid": "u",
                            "digests": {MODEL: [NEW], "rel/path": [NEW]}}).encode()):
        with pytest.raises(PolicySyncError):
            parse_request(raw)


def ready(request_id: str, digests: dict, *, ok: bool = True, car: str = "car7", error: str | None = None) -> bytes:
    return PolicyReady(request_id, car, UUID, ok, UUID, 2, {path: tuple(values) for path, values in digests.items()},
                       error).encode()


def test_ready_counts_only_when_every_digest_is_listed():
    sync = PolicySync(fleet="lab", car="car7", uuid=UUID, publish=lambda t, p: None)
    request_id = sync.request({MODEL: [NEW]})
    sync.on_ready(ready(request_id, {MODEL: [OLD]}))  # ok, but without the digest asked for
    assert not sync.ready(request_id)
    sync.on_ready(ready(request_id, {MODEL: [OLD, NEW]}))
    assert sync.ready(request_id)
    result = sync.result(request_id)
    assert result is not None and result.release == 2 and parse_ready(ready(request_id, {MODEL: [NEW]})).ok


def test_confirmations_for_others_are_refused_and_counted():
    sync = PolicySync(fleet="lab", car="car7", uuid=UUID, publish=lambda t, p: None)
    request_id = sync.request({MODEL: [NEW]})
    sync.on_ready(ready(request_id, {MODEL: [NEW]}, car="car8"))
    sync.on_ready(ready("someone-else", {MODEL: [NEW]}))
    sync.on_ready(b"not json")
    assert sync.refused == 3 and not sync.ready(request_id)


def test_wait_ready_wakes_on_a_confirmation_from_another_thread():
    sent: list[tuple[str, bytes]] = []
    sync = PolicySync(fleet="lab", car="car7", uuid=UUID, publish=lambda t, p: sent.append((t, p)), retry_s=5)

    async def main() -> bool:
        request_id = sync.request({MODEL: [NEW]})
        timer = threading.Timer(0.1, sync.on_ready, [ready(request_id, {MODEL: [NEW]})])  # paho's thread
        timer.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await sync.wait_ready(request_id, timeout=5)
        assert loop.time() - started < 1
        return result

    assert asyncio.run(main()) is True
    assert len(sent) == 1  # answered before the first retry


def test_wait_ready_repeats_the_request_and_times_out():
    sent: list[tuple[str, bytes]] = []
    sync = PolicySync(fleet="lab", car="car7", uuid=UUID, publish=lambda t, p: sent.append((t, p)), retry_s=0.1)

    async def main() -> bool:
        return await sync.wait_ready(sync.request({MODEL: [NEW]}), timeout=0.35)

    assert asyncio.run(main()) is False
    assert len(sent) >= 3 and len({payload for _, payload in sent}) == 1  # the same request, repeated


def test_wait_ready_returns_false_on_a_refusal_and_at_once_when_already_answered():
    sync = PolicySync(fleet="lab", car="car7", uuid=UUID, publish=lambda t, p: None)

    async def main() -> tuple[bool, bool]:
        refused = sync.request({MODEL: [NEW]})
        sync.on_ready(ready(refused, {}, ok=False, error="only paths under /opt/donkey/models/"))
        accepted = sync.request({MODEL: [OLD]})
        sync.on_ready(ready(accepted, {MODEL: [OLD]}))
        return await sync.wait_ready(refused, 5), await sync.wait_ready(accepted, 5)

    assert asyncio.run(main()) == (False, True)
    result = sync.result(sync.request({MODEL: [NEW]}))
    assert result is None
    with pytest.raises(KeyError):
        asyncio.run(sync.wait_ready("unknown-id", 1))
