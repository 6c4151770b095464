"""The MQTT side of the agent: presence, telemetry and durable events, on paho-mqtt 2.x.

paho's network loop runs on its own thread (``loop_start``) and reconnects by itself with an
exponential backoff; its callbacks only hand over to the asyncio loop
(``call_soon_threadsafe``), which owns the outbox and every decision. Nothing here can block
the drive core: telemetry reads ``DriveCore.status()`` (a copy), events arrive through the
core's bounded event queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import TelemetryConfig
from agent.core.drive import DriveCore
from agent.core.handoff import Command, Event
from agent.telemetry import commands, homeassistant, topics
from agent.telemetry.commands import SeenIds
from agent.telemetry.outbox import Outbox
from agent.telemetry.platform import platform_health

log = logging.getLogger("donkey-agent.telemetry")

EVENT_BATCH = 20  # events published per pump tick (rate limit after a reconnect)
COMMAND_TIMEOUT = 2.0  # s for the drive core to apply a command
PUMP_INTERVAL = 0.1


def default_outbox() -> Path:
    state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    base = Path(state.split(":")[0]) if state else Path.home() / ".local" / "state" / "donkey-agent"
    return base / "outbox.db"


class TelemetryService:
    def __init__(self, config: TelemetryConfig, identity: dict[str, Any]) -> None:
        assert config.url is not None
        self.config = config
        self.topics = topics.Topics(config.fleet, config.car_id)
        self.identity = identity
        self.outbox = Outbox(config.outbox or default_outbox(), max_events=config.outbox_max_events)
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[int, str] = {}  # paho mid -> event id
        self.core: DriveCore | None = None  # attached once built; commands go to its queue
        self.seen = SeenIds()
        self._pending: dict[str, tuple[str, float]] = {}  # command id -> (name, deadline)
        self._refused: set[str] = set()  # events the broker refused on this connection
        self._seq = 0
        self.client = self._make_client()

    # -- paho set-up ---------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        url = urlparse(str(self.config.url))
        protocol = mqtt.MQTTv5 if self.config.protocol == "5" else mqtt.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"donkey-{self.config.car_id}",
                             protocol=protocol)
        if url.scheme == "mqtts":
            context = ssl.create_default_context(cafile=str(self.config.ca) if self.config.ca else None)
            if self.config.cert is not None:
                context.load_cert_chain(str(self.config.cert), str(self.config.key) if self.config.key else None)
            client.tls_set_context(context)
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        client.will_set(self.topics.state, json.dumps(topics.will(self.config.car_id)), qos=1, retain=True)
        # Exponential backoff (paho doubles the delay per attempt), with a per-car random start and cap
        # so that a fleet does not reconnect in lockstep after a broker restart.
        client.reconnect_delay_set(min_delay=random.uniform(0.5, 1.5), max_delay=random.uniform(25.0, 35.0))  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _call(self, callback: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        # The birth goes out first on every connect, so "online" always follows a will.
        client.publish(self.topics.state, json.dumps(topics.birth(self.identity)), qos=1, retain=True)
        client.subscribe(f"{self.topics.base}/cmd/+", qos=1)
        if self.config.homeassistant:
            self._publish_discovery()
            client.subscribe(f"{self.config.homeassistant_prefix}/status", qos=1)
        self._call(self._connected)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._call(self._disconnected, str(reason))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._call(self._acknowledged, mid, bool(getattr(reason, "is_failure", False)), str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.config.homeassistant and message.topic == f"{self.config.homeassistant_prefix}/status":
            if bytes(message.payload) == b"online":  # Home Assistant restarted: tell it about us again
                self._publish_discovery()
            return
        self._call(self._command, message.topic, bytes(message.payload))

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
        if self.connected.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)
        self.connected.clear()

    def _acknowledged(self, mid: int, refused: bool = False, reason: str = "") -> None:
        event_id = self._inflight.pop(mid, None)
        if event_id is None:
            return
        if refused:  # MQTT 5: the broker answered but did not take it (e.g. not authorised)
            if not self._refused:
                log.warning("the broker refused an event (%s); kept in the outbox until the next connection", reason)
            self._refused.add(event_id)
            return
        self.outbox.acknowledge(event_id)

    def attach(self, core: DriveCore) -> None:
        self.core = core

    def _respond(self, name: str, command_id: str, status: str, reason: str = "", result: Any = None) -> None:
        body = commands.response(status, command_id, reason=reason, result=result, ts=topics.now_ms())
        self.client.publish(f"{self.topics.base}/cmd/{name}/{command_id}/res", json.dumps(body), qos=1, retain=True)

    def _command(self, topic: str, payload: bytes) -> None:
        """A command from the fleet: validate, answer init, hand it to the core, answer the outcome."""
        name = topic.rsplit("/", 1)[-1]
        core = self.core
        if core is None:
            return
        parsed = commands.parse(name, payload, now=time.time(), seen=self.seen, latched=core.latched,
                                max_throttle=core.max_throttle)
        if parsed.error:
            log.warning("command %s refused: %s", name, parsed.error)
            if parsed.id is not None:
                self._respond(name, parsed.id, "failed", parsed.error)
            return
        assert parsed.id is not None
        self._respond(name, parsed.id, "init")
        if name == "ping":
            self._respond(name, parsed.id, "successful", result={"pong": topics.now_ms()})
            return
        self._respond(name, parsed.id, "executing")
        self._pending[parsed.id] = (name, time.monotonic() + COMMAND_TIMEOUT)
        core.commands.push(Command(name, parsed.value, source="mqtt", id=parsed.id))

    def command_result(self, event: Event) -> None:
        """The core applied (or refused) a command from us: answer with the outcome."""
        command_id = event.detail.get("id")
        if not isinstance(command_id, str) or command_id not in self._pending:
            return
        name, _ = self._pending.pop(command_id)
        status = "successful" if event.detail.get("ok") else "failed"
        self._respond(name, command_id, status, str(event.detail.get("reason") or ""))

    def _expire_commands(self) -> None:
        now = time.monotonic()
        for command_id, (name, deadline) in list(self._pending.items()):
            if now > deadline:
                del self._pending[command_id]
                self._respond(name, command_id, "failed", "timeout: the drive core did not answer")

    def record(self, event: Event) -> None:
        """A drive-core event into the durable outbox (called on the asyncio loop)."""
        event_id = str(uuid.uuid4())
        detail = {k: v for k, v in event.detail.items() if isinstance(v, str | int | float | bool | list | type(None))}
        self.outbox.add(event_id, topics.event(event_id, event.kind, detail, event.wall))

    async def flush(self, timeout: float) -> None:
        """Give queued events a chance to reach the broker before a planned disconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.outbox) and self.connected.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def run(self, stop: asyncio.Event, status: Any) -> None:
        """Connect and publish until ``stop``; ``status()`` returns the drive core's status."""
        self._loop = asyncio.get_running_loop()
        url = urlparse(str(self.config.url))
        default_port = 8883 if url.scheme == "mqtts" else 1883
        self.client.connect_async(str(url.hostname or "localhost"), url.port or default_port,
                                  keepalive=self.config.keepalive_s)
        self.client.loop_start()
        try:
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
            self.client.disconnect()
            self.client.loop_stop()
            self.outbox.close()

    async def _publish_telemetry(self, stop: asyncio.Event, status: Any) -> None:
        period = 1.0 / self.config.rate_hz
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if self.connected.is_set() and not stop.is_set():
                self._seq += 1
                payload = topics.telemetry(self._seq, status(), platform_health())
                self.client.publish(self.topics.telemetry, json.dumps(payload), qos=0)

    async def _pump_events(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PUMP_INTERVAL)
            self._expire_commands()
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
