"""The fleet link's containment: it is built, run and restarted here, and never stops the car.

Everything that can fail in the fleet link (TLS files that are missing, an outbox that cannot
be written, a broker host that does not resolve, a bug) fails inside ``FleetLink.run``: the
failure is logged, the service is detached, and it is built again after a backoff (1 s doubling
to 60 s, with jitter). While no service is attached, drive-core events wait in a bounded memory
buffer (the oldest dropped and counted beyond it) and go into the outbox when the link is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import TelemetryConfig
from agent.core.commands import CommandLane
from agent.core.handoff import Event
from agent.core.stops import StopSource
from agent.telemetry.service import TelemetryService

log = logging.getLogger("donkey-agent.telemetry")

BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 60.0
BUFFER_EVENTS = 1000


class FleetLink:
    def __init__(self, config: TelemetryConfig, identity: dict[str, Any], *, outbox_path: Path,
                 lane: CommandLane, estop: StopSource, jobs: CommandLane | None = None,
                 state_fields: Callable[[], dict[str, Any]] | None = None,
                 listeners: dict[str, Callable[[bytes], None]] | None = None) -> None:
        self.config = config
        self.listeners = listeners if listeners is not None else {}  # may be filled in after construction
        self.state_fields = state_fields
        self.identity = identity
        self.outbox_path = outbox_path
        self.lane = lane
        self.jobs = jobs
        self.estop = estop
        self.service: TelemetryService | None = None
        self._buffer: deque[Event] = deque()
        self.events_lost = 0
        self.failures = 0
        self.last_failure = ""

    def record(self, event: Event) -> None:
        """A drive-core event: into the outbox, or the buffer while the link is down (never raises)."""
        service = self.service
        if service is not None:
            try:
                service.record(event)
                return
            except Exception as exc:  # the outbox failed: the service is finished, run() rebuilds it
                self._detach(f"the outbox failed: {type(exc).__name__}: {exc}")
        if len(self._buffer) >= BUFFER_EVENTS:
            self._buffer.popleft()
            self.events_lost += 1
        self._buffer.append(event)

    def _detach(self, why: str) -> None:
        if self.service is not None:
            self.service.closed = True  # no more records; run() notices and tears it down
            self.service = None
            self.last_failure = why

    def stats(self) -> dict[str, float]:
        service = self.service
        base = service.stats() if service is not None else {"donkey_broker_connected": 0}
        return {**base, "donkey_fleet_link_failures": self.failures, "donkey_fleet_events_lost": self.events_lost,
                "donkey_fleet_events_buffered": len(self._buffer)}

    def publish(self, topic: str, payload: bytes) -> bool:
        """To the fleet while connected (from the loop's thread); False when not: the caller retries."""
        service = self.service
        return service is not None and service.publish(topic, payload)

    @property
    def connected(self) -> bool:
        service = self.service
        return service is not None and service.connected.is_set()

    async def flush(self, timeout: float) -> None:
        if self.service is not None:
            await self.service.flush(timeout)

    async def run(self, stop: asyncio.Event, status: Callable[[], dict[str, Any]]) -> None:
        backoff = BACKOFF_MIN_S
        while not stop.is_set():
            service: TelemetryService | None = None
            try:
                service = TelemetryService(self.config, self.identity, outbox_path=self.outbox_path, lane=self.lane,
                                           estop=self.estop, jobs=self.jobs, state_fields=self.state_fields,
                                           listeners=self.listeners)
                while self._buffer:
                    service.record(self._buffer[0])
                    self._buffer.popleft()
                self.service = service
                runner = asyncio.create_task(service.run(stop, status), name="mqtt-service")
                while not runner.done():  # also notices a detach by record()
                    await asyncio.wait({runner}, timeout=0.5)
                    if self.service is not service and not runner.done():
                        runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
                if stop.is_set():
                    return
                if self.service is service:
                    raise RuntimeError("the MQTT service ended by itself")
            except Exception as exc:
                self.failures += 1
                while isinstance(exc, ExceptionGroup) and exc.exceptions:  # a TaskGroup's: name the cause
                    exc = exc.exceptions[0]
                why = f"{type(exc).__name__}: {exc}"
                self.last_failure = why
                log.error("the fleet link failed (%s); driving continues, retrying in %.0f s", why, backoff)
            finally:
                if service is not None:
                    service.closed = True
                    with contextlib.suppress(Exception):
                        service.outbox.close()
                    with contextlib.suppress(Exception):
                        service.client.loop_stop()
                self.service = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff * random.uniform(0.8, 1.2))
            backoff = min(BACKOFF_MAX_S, backoff * 2)
