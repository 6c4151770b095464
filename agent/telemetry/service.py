"""The MQTT side of the agent: presence, telemetry, durable events and commands, on paho-mqtt 2.x.

paho's network loop runs on its own thread (``loop_start``) and reconnects by itself with an
exponential backoff. Its message callback does two things only: an ``estop`` presses the car's
stop board at once (a lock-free counter write, before any parsing or queueing, so no bound and
no slow loop can lose it), and every message goes into a bounded inbound queue (overflow is
counted) that the asyncio loop drains. The loop owns the outbox, the command answers and every
other decision. Nothing here can block the drive core: telemetry reads its published snapshot,
events arrive through its bounded event queue, commands go through the core's ``mqtt`` lane.

``FleetLink`` (agent/telemetry/link.py) constructs and runs this service inside a containment
that restarts it with a backoff, so a failing fleet link never stops the car.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import TelemetryConfig
from agent.core.commands import Command, CommandLane
from agent.core.handoff import Event
from agent.core.stops import StopSource
from agent.errors import AgentError
from agent.ratelimit import TokenBucket
from agent.telemetry import commands, homeassistant, topics
from agent.telemetry.commands import SeenIds
from agent.telemetry.outbox import Outbox
from agent.telemetry.platform import platform_health

log = logging.getLogger("donkey-agent.telemetry")

EVENT_BATCH = 20  # events published per pump tick (rate limit after a reconnect)
PUMP_INTERVAL = 0.05
ANSWER_GRACE_S = 0.5  # after a command's expiry, before "timeout" is answered (the core refuses it by then)
INBOUND_CAPACITY = 256
FAILED_ANSWERS_PER_S = 20.0  # answers to refused commands; beyond this they are counted, not answered


class FleetLinkError(AgentError, RuntimeError):
    """The fleet link cannot start as configured (TLS files...): the message names the key."""


@dataclass
class Pending:
    """A command handed to the core, or an e-stop pressed, awaiting its outcome."""

    name: str
    id: str
    deadline: float  # monotonic: answer "timeout" after this
    command: Command | None = None
    press: int = 0  # e-stop: the press number the core must acknowledge


@dataclass
class Inbound:
    topic: str
    payload: bytes
    retained: bool
    received: float
    press: int = 0  # non-zero: an e-stop already pressed on the MQTT thread


class TelemetryService:
    def __init__(self, config: TelemetryConfig, identity: dict[str, Any], *, outbox_path: Path,
                 lane: CommandLane, estop: StopSource, jobs: CommandLane | None = None,
                 state_fields: Callable[[], dict[str, Any]] | None = None,
                 listeners: dict[str, Callable[[bytes], None]] | None = None) -> None:
        assert config.url is not None
        # Other topics of this car (the attestation token, policy confirmations) -> a handler on the loop; each
        # validates its own payloads. Subscribed on every connect (QoS 1: a retained token arrives at once).
        self.listeners = dict(listeners or {})
        # What the retained state says besides the identity and changes while running (the models, attestation):
        # republished when it changes.
        self.state_fields = state_fields
        self._state_published: dict[str, Any] | None = None
        self.config = config
        self.topics = topics.Topics(config.fleet, config.car_id)
        self.identity = identity
        self.lane = lane
        self.jobs = jobs  # model_update / model_rollback: to the rollout (None: refused, no models configured)
        self.estop = estop
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[int, str] = {}  # paho mid -> event id
        self.seen = SeenIds()
        self._pending: dict[str, Pending] = {}  # command id -> what we wait for
        self._refused: set[str] = set()  # events the broker refused on this connection
        self._inbound: deque[Inbound] = deque()
        self._drain_scheduled = False
        self._answer_budget = TokenBucket(FAILED_ANSWERS_PER_S, FAILED_ANSWERS_PER_S)
        self.counters = {"inbound_dropped": 0, "unanswered": 0, "refused": 0}
        self._seq = 0
        self.closed = False
        self.client = self._make_client()  # TLS files are read here: a missing one fails construction
        self.outbox = Outbox(outbox_path, max_events=config.outbox_max_events)

    # -- paho set-up ---------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        url = urlparse(str(self.config.url))
        protocol = mqtt.MQTTv5 if self.config.protocol == "5" else mqtt.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"donkey-{self.config.car_id}",
                             protocol=protocol)
        if url.scheme == "mqtts":
            client.tls_set_context(self._tls_context())
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        client.will_set(self.topics.state, json.dumps(topics.will(self.config.car_id)), qos=1, retain=True)
        # Exponential backoff (paho doubles the delay per attempt), with a per-car random start and cap
        # so that a fleet does not reconnect in lockstep after a broker restart.
        client.reconnect_delay_set(min_delay=random.uniform(0.5, 1.5), max_delay=random.uniform(25.0, 35.0))  # type: ignore[arg-type]
        client.max_queued_messages_set(1000)  # paho's own outgoing queue while disconnected: bounded
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _tls_context(self) -> ssl.SSLContext:
        """The TLS context; a file that cannot be used is named with its config key."""
        config = self.config
        for key, path in (("ca", config.ca), ("cert", config.cert), ("key", config.key)):
            if path is not None and not path.is_file():
                raise FleetLinkError(f"telemetry.{key}: {path}: no such file")
        try:
            context = ssl.create_default_context(cafile=str(config.ca) if config.ca else None)
            if config.cert is not None:
                context.load_cert_chain(str(config.cert), str(config.key) if config.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise FleetLinkError(f"telemetry.ca/cert/key: {exc}") from None
        return context

    def _call(self, callback: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                self._loop.call_soon_threadsafe(callback, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        # The birth goes out first on every connect, so "online" always follows a will.
        client.publish(self.topics.state, json.dumps(self._birth()), qos=1, retain=True)
        client.subscribe(f"{self.topics.base}/cmd/+", qos=1)
        for topic in self.listeners:
            client.subscribe(topic, qos=1)
        if self.config.homeassistant:
            self._publish_discovery()
            client.subscribe(f"{self.config.homeassistant_prefix}/status", qos=1)
        self._call(self._connected)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._call(self._disconnected, str(reason))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._call(self._acknowledged, mid, bool(getattr(reason, "is_failure", False)), str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """paho's thread: press an e-stop at once, queue everything else (bounded) for the loop."""
        topic, payload, retained = message.topic, bytes(message.payload), bool(message.retain)
        if self.config.homeassistant and topic == f"{self.config.homeassistant_prefix}/status":
            if payload == b"online":  # Home Assistant restarted: tell it about us again
                self._publish_discovery()
            return
        received = time.monotonic()
        press = 0
        if topic == f"{self.topics.base}/cmd/estop" and not retained:
            # Whatever the payload says (malformed, expired, a duplicate id): a stop is never refused.
            press = self.estop.press("e-stop command over MQTT", id=commands.command_id(payload), at=received)
        if len(self._inbound) >= (2 * INBOUND_CAPACITY if press else INBOUND_CAPACITY):
            self.counters["inbound_dropped"] += 1  # a dropped e-stop was pressed all the same: its answer is lost
            return
        self._inbound.append(Inbound(topic, payload, retained, received, press))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._call(self._drain_inbound)

    def _birth(self) -> dict[str, Any]:
        fields = self.state_fields() if self.state_fields is not None else {}
        self._state_published = fields
        return topics.birth({**self.identity, **fields})

    def _publish_discovery(self) -> None:
        for topic, payload in homeassistant.discovery(self.topics, self.identity, self.config.homeassistant_prefix):
            self.client.publish(topic, payload, qos=1, retain=True)

    # -- on the asyncio loop ----------------------------------------------------------------------
    def _connected(self) -> None:
        log.info("connected to %s as %s", self.config.url, self.topics.base)
        self._inflight.clear()  # unacknowledged events are sent again, in order (subscribers dedupe by id)
        self._refused.clear()
        self.connected.set()

    def _disconnected(self, reason: str) -> None:
        if self.connected.is_set() and not self.closed:
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        self.connected.clear()

    def _acknowledged(self, mid: int, refused: bool = False, reason: str = "") -> None:
        event_id = self._inflight.pop(mid, None)
        if event_id is None or self.closed:
            return
        if refused:  # MQTT 5: the broker answered but did not take it (e.g. not authorised)
            if not self._refused:
                log.warning("the broker refused an event (%s); kept in the outbox until the next connection", reason)
            self._refused.add(event_id)
            return
        self.outbox.acknowledge(event_id)

    def _respond(self, name: str, command_id: str, status: str, reason: str = "", result: Any = None) -> None:
        body = commands.response(status, command_id, reason=reason, result=result, ts=topics.now_ms())
        properties = None
        if self.config.protocol == "5":  # the retained state goes away by itself (3.1.1: the requester clears it)
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = self.config.command_result_expiry_s
        self.client.publish(f"{self.topics.base}/cmd/{name}/{command_id}/res", json.dumps(body), qos=1, retain=True,
                            properties=properties)

    def _fail(self, name: str, command_id: str | None, reason: str) -> None:
        """Refuse a command: logged (rate-limited by the log filter) and answered, within a budget."""
        self.counters["refused"] += 1
        log.warning("command %s refused: %s", name, reason)
        if command_id is None:
            return
        if self._answer_budget.take():
            self._respond(name, command_id, "failed", reason)
        else:
            self.counters["unanswered"] += 1

    def _drain_inbound(self) -> None:
        self._drain_scheduled = False
        while self._inbound:
            item = self._inbound.popleft()
            handler = self.listeners.get(item.topic)
            if handler is not None:
                try:
                    handler(item.payload)  # each handler validates its own payloads
                except Exception:
                    log.exception("a message on %s could not be processed", item.topic)
                continue
            self._command(item)

    def _command(self, item: Inbound) -> None:
        """A command from the fleet: validate, answer init, hand it to the core, track the outcome."""
        name = item.topic.rsplit("/", 1)[-1]
        parsed = commands.parse(name, item.payload, now=time.time(), received=item.received, seen=self.seen,
                                retained=item.retained)
        if item.press:  # already pressed: answer once the core has latched it, whatever the payload
            if parsed.error and not parsed.error.startswith("duplicate") and parsed.id is not None:
                log.info("e-stop %s pressed despite its payload: %s", parsed.id, parsed.error)
            if parsed.id is not None and not parsed.error.startswith("duplicate"):
                self._respond(name, parsed.id, "init")
                self._respond(name, parsed.id, "executing")
                self._pending[parsed.id] = Pending(name, parsed.id, item.received + commands.TIMEOUT_S,
                                                   press=item.press)
            return
        if parsed.error:
            self._fail(name, parsed.id, parsed.error)
            return
        assert parsed.id is not None
        if name == "ping":
            self._respond(name, parsed.id, "init")
            self._respond(name, parsed.id, "successful", result={"pong": topics.now_ms()})
            return
        assert parsed.command is not None
        lane = self.jobs if name in commands.JOBS else self.lane
        if lane is None:
            self._fail(name, parsed.id, "refused: this car takes no model updates ([models] is not configured)")
            return
        refusal = lane.submit(parsed.command)
        if refusal:
            self._fail(name, parsed.id, refusal)
            return
        self._respond(name, parsed.id, "init")
        self._respond(name, parsed.id, "executing")
        deadline = parsed.command.expires if math.isfinite(parsed.command.expires) else item.received
        if parsed.command.answer_within_s is not None:  # a job: taken at once, done when it is done
            deadline = item.received + parsed.command.answer_within_s
        self._pending[parsed.id] = Pending(name, parsed.id, deadline + ANSWER_GRACE_S, command=parsed.command)

    def _answer_pending(self) -> None:
        """Answer every command whose outcome is known, and time out those the core never took."""
        now = time.monotonic()
        for command_id, pending in list(self._pending.items()):
            if pending.command is not None and pending.command.outcome is not None:
                outcome = pending.command.outcome
                self._respond(pending.name, command_id, "successful" if outcome.ok else "failed", outcome.reason)
            elif pending.press and self.estop.acknowledged(pending.press):
                self._respond(pending.name, command_id, "successful", "e-stop latched")
            elif now > pending.deadline:
                reason = ("timeout: the drive core has not latched it yet; the e-stop stays requested" if pending.press
                          else "timeout: the drive core did not take it, and never will (it has expired)")
                self._respond(pending.name, command_id, "failed", reason)
            else:
                continue
            del self._pending[command_id]

    def publish(self, topic: str, payload: bytes) -> bool:
        """A message to the fleet (QoS 1, not retained) while connected; False when not (the caller retries)."""
        if self.closed or not self.connected.is_set():
            return False
        return self.client.publish(topic, payload, qos=1).rc == mqtt.MQTT_ERR_SUCCESS

    def record(self, event: Event) -> None:
        """A drive-core event into the durable outbox (on the asyncio loop); raises once closed."""
        if self.closed:
            raise RuntimeError("the fleet link is closed")
        event_id = str(uuid.uuid4())
        detail = {k: v for k, v in event.detail.items() if isinstance(v, str | int | float | bool | list | type(None))}
        self.outbox.add(event_id, topics.event(event_id, event.kind, detail, event.wall))

    def stats(self) -> dict[str, float]:
        return {"donkey_outbox_events": len(self.outbox) if not self.closed else 0,
                "donkey_outbox_dropped": self.outbox.dropped if not self.closed else 0,
                "donkey_broker_connected": int(self.connected.is_set()),
                **{f"donkey_mqtt_{k}": float(v) for k, v in self.counters.items()}}

    async def flush(self, timeout: float) -> None:
        """Give queued events and answers a chance to reach the broker before a planned disconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._answer_pending()
        while not self.closed and len(self.outbox) and self.connected.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def run(self, stop: asyncio.Event, status: Callable[[], dict[str, Any]]) -> None:
        """Connect and publish until ``stop``; ``status()`` returns the drive core's status."""
        self._loop = asyncio.get_running_loop()
        url = urlparse(str(self.config.url))
        default_port = 8883 if url.scheme == "mqtts" else 1883
        try:
            self.client.connect_async(str(url.hostname or "localhost"), url.port or default_port,
                                      keepalive=self.config.keepalive_s)
            self.client.loop_start()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._publish_telemetry(stop, status), name="mqtt-telemetry")
                tasks.create_task(self._pump_events(stop), name="mqtt-events")
        finally:
            if self.connected.is_set():
                # A clean goodbye: the state says why, and the will is not needed.
                offline = {**topics.will(self.config.car_id), "reason": "stopped"}
                info = self.client.publish(self.topics.state, json.dumps(offline), qos=1, retain=True)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(info.wait_for_publish, 2.0)
            self.closed = True
            log.info("fleet link closed: %s", ", ".join(f"{k} {v}" for k, v in self.counters.items()))
            self.client.disconnect()
            self.client.loop_stop()
            self.outbox.close()

    async def _publish_telemetry(self, stop: asyncio.Event, status: Callable[[], dict[str, Any]]) -> None:
        period = 1.0 / self.config.rate_hz
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if self.connected.is_set() and not stop.is_set():
                if self.state_fields is not None and self.state_fields() != self._state_published:
                    self.client.publish(self.topics.state, json.dumps(self._birth()), qos=1, retain=True)
                self._seq += 1
                payload = topics.telemetry(self._seq, status(), platform_health())
                self.client.publish(self.topics.telemetry, json.dumps(payload), qos=0)

    async def _pump_events(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PUMP_INTERVAL)
            self._answer_pending()
            if not self.connected.is_set():
                continue
            skip = set(self._inflight.values()) | self._refused
            sent = 0
            for pending in self.outbox.pending(limit=EVENT_BATCH + len(skip)):
                if pending.id in skip:
                    continue
                info = self.client.publish(self.topics.events, json.dumps(pending.payload), qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                self._inflight[info.mid] = pending.id
                sent += 1
                if sent >= EVENT_BATCH:
                    break
