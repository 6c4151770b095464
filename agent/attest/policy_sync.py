"""Policy first, then the measurement: a car asks the fleet to list a new file's digest before it opens the file.

With attestation required, a model install must not open a new model file until the car's named runtime policy on
the Keylime verifier lists its sha256: IMA measures the file when it is first opened, and a log entry whose digest
the policy does not list fails attestation (``ima.validation.ima-ng.runtime_policy_hash``; in pull mode that is
terminal, reference §8). So the car publishes a request, the fleet bridge merges the digests into the policy and
confirms, and only then does the car open the file.

Topics (``donkey/<fleet>/<car>/...``, QoS 1, not retained):

- ``attestation/policy`` (car -> fleet): ``{"version": 1, "request_id", "car", "uuid", "digests": {path: [sha256,
  ...]}}``. The bridge takes it through an MQTT 5 shared subscription (one instance of several handles each).
- ``attestation/policy/ready`` (fleet -> car): ``{"version": 1, "request_id", "car", "uuid", "ok", "policy",
  "release", "digests": {path: [every digest the policy now lists for the requested paths]}, "error"}``.

The car does not take ``ok`` on trust alone: ``PolicySync`` counts a request ready only when the confirmation lists
every requested digest under its path. A forged confirmation can at worst make the car open a file too early, which
fails attestation and stops autonomy: never the reverse. Requests are idempotent (a digest already listed is
confirmed at once), so the car repeats its request while it waits, which covers a bridge restart or a lost message.

This module is pure apart from ``PolicySync``'s asyncio waiting: publishing is injected.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError

VERSION = 1
SHARE_GROUP = "donkey-attest-bridge"
MAX_PATHS = 64
MAX_DIGESTS_PER_PATH = 32
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{8,64}")


class PolicySyncError(AgentError, ValueError):
    """A policy request or confirmation that is not well formed; the message says why."""


def policy_topic(fleet: str, car: str) -> str:
    return f"donkey/{fleet}/{car}/attestation/policy"


def ready_topic(fleet: str, car: str) -> str:
    return f"donkey/{fleet}/{car}/attestation/policy/ready"


def policy_filter(fleet: str, group: str = SHARE_GROUP) -> str:
    """The bridge's shared subscription: the broker hands each request to one instance of the group."""
    return f"$share/{group}/donkey/{fleet}/+/attestation/policy"


def _digests(value: Any, what: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict) or not value or len(value) > MAX_PATHS:
        raise PolicySyncError(f"{what}: expected 1-{MAX_PATHS} paths, each with a list of sha256 digests")
    digests: dict[str, tuple[str, ...]] = {}
    for path, values in value.items():
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or "\n" in path or len(path) > 4096:
            raise PolicySyncError(f"{what}: {path!r} is not an absolute path")
        if (not isinstance(values, list) or not values or len(values) > MAX_DIGESTS_PER_PATH
                or not all(isinstance(digest, str) and _SHA256.fullmatch(digest) for digest in values)):
            raise PolicySyncError(f"{what}: {path}: expected 1-{MAX_DIGESTS_PER_PATH} lowercase sha256 hex digests")
        digests[path] = tuple(sorted(set(values)))
    return digests


def _object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolicySyncError(f"{what}: not JSON: {exc}") from None
    if not isinstance(value, dict) or value.get("version") != VERSION:
        raise PolicySyncError(f"{what}: expected a JSON object with \"version\": {VERSION}")
    for key in ("request_id", "car", "uuid"):
        if not isinstance(value.get(key), str):
            raise PolicySyncError(f"{what}: {key}: expected a string")
    if not _REQUEST_ID.fullmatch(value["request_id"]):
        raise PolicySyncError(f"{what}: request_id: expected 8-64 of A-Z a-z 0-9 _ -")
    return value


@dataclass(frozen=True)
class PolicyRequest:
    request_id: str
    car: str
    uuid: str
    digests: Mapping[str, tuple[str, ...]]

    def encode(self) -> bytes:
        return json.dumps({"version": VERSION, "request_id": self.request_id, "car": self.car, "uuid": self.uuid,
                           "digests": {path: list(values) for path, values in sorted(self.digests.items())}},
                          separators=(",", ":")).encode()


def parse_request(payload: bytes) -> PolicyRequest:
    value = _object(payload, "policy request")
    return PolicyRequest(value["request_id"], value["car"], value["uuid"].lower(),
                         _digests(value.get("digests"), "policy request digests"))


@dataclass(frozen=True)
class PolicyReady:
    request_id: str
    car: str
    uuid: str
    ok: bool
    policy: str = ""
    release: int | None = None
    digests: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str | None = None

    def encode(self) -> bytes:
        return json.dumps({"version": VERSION, "request_id": self.request_id, "car": self.car, "uuid": self.uuid,
                           "ok": self.ok, "policy": self.policy, "release": self.release,
                           "digests": {path: list(values) for path, values in sorted(self.digests.items())},
                           "error": self.error}, separators=(",", ":")).encode()

    def covers(self, digests: Mapping[str, Iterable[str]]) -> bool:
        """``ok`` and every requested digest listed under its path."""
        return self.ok and all(set(values) <= set(self.digests.get(path, ())) for path, values in digests.items())


def parse_ready(payload: bytes) -> PolicyReady:
    value = _object(payload, "policy ready")
    ok = value.get("ok")
    release = value.get("release")
    if not isinstance(ok, bool) or not (release is None or (isinstance(release, int) and not isinstance(release,
                                                                                                          bool))):
        raise PolicySyncError("policy ready: ok must be a boolean and release an integer or null")
    digests = _digests(value["digests"], "policy ready digests") if ok else {}
    error = value.get("error")
    return PolicyReady(value["request_id"], value["car"], value["uuid"].lower(), ok, str(value.get("policy") or ""),
                       release, digests, str(error) if error is not None else None)


def merge(runtime_policy: Mapping[str, Any], digests: Mapping[str, Iterable[str]],
          now: Callable[[], datetime.datetime] = datetime.datetime.now) -> tuple[dict[str, Any], bool]:
    """The policy with ``digests`` added (a union: nothing is ever removed here) and whether anything changed.

    Old digests stay until the car reboots: the IMA log keeps every entry since boot and the verifier re-validates
    from entry 0 (reference §8, keylime#1515). A change raises ``release`` by one and stamps ``meta.timestamp``.
    """
    merged = json.loads(json.dumps(runtime_policy))  # a deep copy of plain JSON
    listed: dict[str, list[str]] = merged.setdefault("digests", {})
    changed = False
    for path, values in digests.items():
        current = listed.setdefault(path, [])
        for digest in values:
            if digest not in current:
                current.append(digest)
                changed = True
        current.sort()
    if changed:
        release = merged.get("release")
        merged["release"] = (release if isinstance(release, int) else 0) + 1
        merged.setdefault("meta", {"version": 1, "generator": 3})["timestamp"] = str(now())
    return merged, changed


Publish = Callable[[str, bytes], None]  # topic, payload: the caller publishes with QoS 1, not retained


class PolicySync:
    """The car's side: ``request`` publishes, ``on_ready`` takes confirmations, ``wait_ready`` awaits one.

    ``on_ready`` may be called from any thread (paho's network thread) or from the event loop. ``wait_ready``
    repeats the request every ``retry_s`` while it waits (requests are idempotent).
    """

    def __init__(self, *, fleet: str, car: str, uuid: str, publish: Publish, retry_s: float = 5.0,
                 new_id: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self.fleet, self.car, self.uuid = fleet, car, uuid.lower()
        self.publish = publish
        self.retry_s = retry_s
        self.new_id = new_id
        self.request_topic = policy_topic(fleet, car)
        self.ready_topic = ready_topic(fleet, car)
        self._lock = threading.Lock()
        self._requests: dict[str, PolicyRequest] = {}
        self._results: dict[str, PolicyReady] = {}
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self.refused = 0  # confirmations that were malformed, for another car, or for no request of ours

    def request(self, paths_to_digests: Mapping[str, Iterable[str]]) -> str:
        """Publish a request for these digests (by the absolute path the file will be opened by); its id."""
        digests = _digests({path: list(values) for path, values in paths_to_digests.items()}, "request")
        request = PolicyRequest(self.new_id(), self.car, self.uuid, digests)
        with self._lock:
            self._requests[request.request_id] = request
        self.publish(self.request_topic, request.encode())
        return request.request_id

    def on_ready(self, payload: bytes) -> None:
        try:
            ready = parse_ready(payload)
        except PolicySyncError:
            self.refused += 1
            return
        with self._lock:
            request = self._requests.get(ready.request_id)
            if request is None or ready.car != self.car or ready.uuid != self.uuid:
                self.refused += 1
                return
            self._results[ready.request_id] = ready
            waiters = self._waiters.pop(ready.request_id, [])
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def result(self, request_id: str) -> PolicyReady | None:
        with self._lock:
            return self._results.get(request_id)

    def ready(self, request_id: str) -> bool:
        """Whether the confirmation for ``request_id`` arrived and lists every requested digest."""
        with self._lock:
            request, result = self._requests.get(request_id), self._results.get(request_id)
        return request is not None and result is not None and result.covers(request.digests)

    async def wait_ready(self, request_id: str, timeout: float) -> bool:
        """True once the policy lists the request's digests; False on a refusal or when ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                request = self._requests.get(request_id)
                if request is None:
                    raise KeyError(request_id)
                result = self._results.get(request_id)
                if result is None:
                    event = asyncio.Event()
                    self._waiters.setdefault(request_id, []).append((loop, event))
            if result is not None:
                return result.covers(request.digests)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._forget_waiter(request_id, event)
                return False
            try:
                await asyncio.wait_for(event.wait(), min(self.retry_s, remaining))
            except TimeoutError:
                self._forget_waiter(request_id, event)
                if deadline - time.monotonic() > 0:
                    self.publish(self.request_topic, request.encode())  # idempotent: a lost message, a restart

    def _forget_waiter(self, request_id: str, event: asyncio.Event) -> None:
        with self._lock:
            waiters = self._waiters.get(request_id, [])
            self._waiters[request_id] = [(loop, other) for loop, other in waiters if other is not event]
            if not self._waiters[request_id]:
                del self._waiters[request_id]

    def forget(self, request_id: str) -> None:
        """Drop a finished request (the model is open, or the install was abandoned)."""
        with self._lock:
            self._requests.pop(request_id, None)
            self._results.pop(request_id, None)
