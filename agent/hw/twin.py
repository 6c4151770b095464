"""The twin backends: camera and actuators over one Donkey simulator protocol connection.

The same code drives our twin and the Unity Donkey simulator. The link outlives any one
connection: when the simulator goes away (restart, crash, a broken connection) it
reconnects in the background with exponential backoff and jitter, as a new car, while the
camera keeps its contract (``read`` waits its full timeout and returns None, so the drive
core sees stale frames, a transient fault, and holds neutral) and the actuators drop
commands there is no car to receive (counted, not raised). Frame sequence numbers keep
increasing across connections, as the drive core requires.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from typing import Any

import numpy as np

from agent.hw.donkeysim.client import (
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_SILENCE_TIMEOUT,
    SimClient,
    SimDisconnectedError,
    SimError,
    SimSendError,
    Telemetry,
)
from agent.hw.interfaces import ActuatorError, Frame
from agent.hw.slot import LatestSlot

log = logging.getLogger(__name__)

RETIRE_JOIN_S = 5.0  # how long a reconnect waits for the old reader to stop publishing


class TwinLink:
    """One car on a simulator, kept alive across reconnects; shared by TwinCamera and TwinActuators.

    ``connect()`` makes the first connection (raising SimError if the simulator cannot be
    reached within ``connect_timeout``) and starts the reconnecting supervisor; ``close``
    is idempotent and stops it.
    """

    def __init__(self, host: str, port: int, *, scene: str, width: int = 160, height: int = 120,
                 connect_timeout: float = 15.0, car_name: str = "donkey-agent", reconnect: bool = True,
                 backoff_initial: float = 0.5, backoff_max: float = 5.0,
                 send_timeout: float = DEFAULT_SEND_TIMEOUT,
                 silence_timeout: float | None = DEFAULT_SILENCE_TIMEOUT) -> None:
        self.host, self.port = host, port
        self.scene = scene
        self.width, self.height = width, height
        self.connect_timeout = connect_timeout
        self.car_name = car_name
        self.reconnect = reconnect
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.send_timeout = send_timeout
        self.silence_timeout = silence_timeout
        self.slot: LatestSlot[Telemetry] = LatestSlot()  # shared by every connection, closed by close()
        self._lock = threading.Lock()  # guards the client swap and the counters; never held while blocking
        self._connect_lock = threading.Lock()  # one first connect, however many backends ask
        self._client: SimClient | None = None
        self._pending: SimClient | None = None  # a reconnect attempt in progress
        self._started = False
        self._closed = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._retired: dict[str, Any] = {"frames": 0, "frames_without_image": 0, "bad_messages": {}, "framing": {}}
        self.reconnects = 0  # successful reconnections
        self.failed_attempts = 0  # reconnection attempts that failed
        self.writes_dropped = 0  # controls not sent because there was no connection
        self.last_disconnect_reason: str | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def connect(self) -> TwinLink:
        """The first connection (blocking); later ones are made in the background."""
        with self._connect_lock:
            if self._started or self._closed.is_set():
                return self
            client = self._new_client(retry=True)
            with self._lock:
                self._pending = client  # so that close() can abort a slow first connect
            try:
                client.connect()
            finally:
                with self._lock:
                    self._pending = None
            with self._lock:
                closed = self._closed.is_set()
                if not closed:
                    self._client = client
            if closed:
                client.close()
                return self
            self._started = True
            if self.reconnect:
                self._supervisor = threading.Thread(target=self._supervise, name="twin-link", daemon=True)
                self._supervisor.start()
        return self

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            clients = [c for c in (self._pending, self._client) if c is not None]
        for client in clients:
            client.close()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(2.0)
        self.slot.close()

    def _new_client(self, *, retry: bool) -> SimClient:
        seq = self.slot.latest.seq if self.slot.latest is not None else 0
        return SimClient(self.host, self.port, scene=self.scene, camera={"img_w": self.width, "img_h": self.height},
                         car_name=self.car_name, connect_timeout=self.connect_timeout, retry_connect=retry,
                         send_timeout=self.send_timeout, silence_timeout=self.silence_timeout, slot=self.slot,
                         seq_start=seq)

    # -- reconnecting ----------------------------------------------------------------------
    def _supervise(self) -> None:
        """Wait for the connection to drop, then reconnect until it works or the link closes."""
        delay = self.backoff_initial
        while not self._closed.is_set():
            client = self._client
            if client is None:
                return
            connected_at = time.monotonic()
            client.wait_disconnected()
            if self._closed.is_set():
                return
            self._retire(client)
            if time.monotonic() - connected_at >= self.backoff_max:
                delay = self.backoff_initial  # it was up for a while: this is a new outage
            delay = self._reconnect(delay)

    def _retire(self, client: SimClient) -> None:
        """Fold a finished connection's counters into the link's, once its reader has stopped."""
        client.join(RETIRE_JOIN_S)
        stats = client.stats()
        with self._lock:
            self._client = None
            self.last_disconnect_reason = stats["disconnect_reason"]
            _add_counts(self._retired, stats)
        log.warning("simulator link %s:%s lost (%s); reconnecting", self.host, self.port,
                    self.last_disconnect_reason)

    def _reconnect(self, delay: float) -> float:
        """Try until connected or closed; returns the backoff to start from next time."""
        while not self._closed.wait(delay * random.uniform(0.5, 1.0)):  # jitter: cars do not reconnect in step
            with self._lock:
                if self._closed.is_set():
                    break
                client = self._pending = self._new_client(retry=False)
            try:
                client.connect()
            except SimError as exc:
                with self._lock:
                    self._pending = None
                    self.failed_attempts += 1
                log.info("simulator %s:%s: reconnect failed: %s", self.host, self.port, exc)
                delay = min(self.backoff_max, delay * 2)
                continue
            with self._lock:
                self._pending = None
                closed = self._closed.is_set()
                if not closed:
                    self._client = client
                    self.reconnects += 1
            if closed:  # close() came while the handshake finished
                client.close()
                break
            log.warning("simulator link %s:%s reconnected (a new car)", self.host, self.port)
            return min(self.backoff_max, delay * 2)
        return delay

    # -- what the backends use ---------------------------------------------------------------
    @property
    def client(self) -> SimClient | None:
        """The live connection's client, or None while reconnecting."""
        return self._client

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.connected

    def wait_connected(self, timeout: float) -> bool:
        """Wait until a connection is up (tests, start-up checks)."""
        deadline = time.monotonic() + timeout
        while not self.connected:
            if self._closed.is_set() or time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def send_control(self, steering: float, throttle: float, brake: float = 0.0) -> bool:
        """Send a control; False (counted) if there is no connection to send it on.

        Raises ActuatorError only when a live connection refused the send (it is then
        closed, and the link reconnects).
        """
        client = self._client
        if client is None:
            self._drop()
            return False
        try:
            client.send_control(steering, throttle, brake)
        except SimDisconnectedError:
            self._drop()
            return False
        except SimSendError as exc:
            raise ActuatorError(f"simulator link: {exc}") from exc
        return True

    def _drop(self) -> None:
        with self._lock:
            self.writes_dropped += 1

    def stats(self) -> dict[str, Any]:
        """State and counters for status reports, summed over every connection so far."""
        with self._lock:
            client = self._client
            totals = {"frames": self._retired["frames"],
                      "frames_without_image": self._retired["frames_without_image"],
                      "bad_messages": dict(self._retired["bad_messages"]),
                      "framing": dict(self._retired["framing"])}
            result: dict[str, Any] = {
                "reconnects": self.reconnects,
                "failed_attempts": self.failed_attempts,
                "writes_dropped": self.writes_dropped,
            }
            reason = self.last_disconnect_reason
        if client is not None:
            live = client.stats()
            _add_counts(totals, live)
            reason = live["disconnect_reason"] or reason
        latest = self.slot.latest
        return {"connected": client is not None and client.connected, **result, "disconnect_reason": reason,
                "seq": latest.seq if latest is not None else 0, **totals}


def _add_counts(totals: dict[str, Any], stats: dict[str, Any]) -> None:
    """Add one client's counters to running totals (nested dicts by key)."""
    totals["frames"] += stats["frames"]
    totals["frames_without_image"] += stats["frames_without_image"]
    for group in ("bad_messages", "framing"):
        for key, value in stats[group].items():
            totals[group][key] = totals[group].get(key, 0) + value


class TwinCamera:
    def __init__(self, link: TwinLink) -> None:
        self.link = link.connect()

    def read(self, after_seq: int, timeout: float) -> Frame | None:
        """The newest frame after ``after_seq``; waits the whole ``timeout`` while the link is down."""
        telemetry = self.link.slot.read(after_seq, timeout)
        if telemetry is None:
            return None
        imu = np.array(telemetry.imu, dtype=np.float64)  # floats, checked on arrival: cannot raise
        return Frame(telemetry.seq, telemetry.received, telemetry.image, imu)

    def close(self) -> None:
        self.link.close()


class TwinActuators:
    def __init__(self, link: TwinLink) -> None:
        self.link = link.connect()

    def arm(self) -> None:
        self.neutral()

    def write(self, steering: float, throttle: float) -> None:
        """Raises ActuatorError only if a live connection refuses; without one the write is dropped."""
        self.link.send_control(steering, throttle)

    def neutral(self) -> None:
        self.link.send_control(0.0, 0.0, 0.0)

    def close(self) -> None:
        with contextlib.suppress(ActuatorError):
            self.neutral()
        self.link.close()
