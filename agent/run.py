"""``donkey-agent run``: the daemon around the drive core, on a terminal or under systemd.

The event loop owns I/O and lifecycles (signals, sd_notify, logs, the status line, the safety
state file, the fleet link); the drive core runs on its own thread and never waits on this loop.
Every task lives in one TaskGroup and stops on the same event: SIGTERM/SIGINT, the requested
duration, or the core ending. ``READY=1`` goes out only once the core is warm (camera streaming,
first inference done, actuators at neutral); ``WATCHDOG=1`` only while the core cycles and its
outputs are accepted (see ``DriveCore.health``) and this loop is responsive, never tied to any
network link. Optional services (the fleet link, the metrics endpoint) run contained: their
failure is logged and driving goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack, closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from agent.attest.errors import AttestationSetupError
from agent.config import AgentConfig, ConfigError, load
from agent.core.commands import CommandLane, SetMaxThrottle
from agent.core.control import MODES, NEEDS_PILOT
from agent.core.drive import RECORD_INPUTS, RECORD_TYPES, DriveCore, DriveParts
from agent.core.handoff import Clearance
from agent.errors import AgentError
from agent.hw.errors import HardwareUnavailableError
from agent.hw.factory import build_hardware
from agent.hw.gpio import EStopButton, StatusLed
from agent.hw.interfaces import Actuators, Camera
from agent.pilot import Autopilot, ModelError
from agent.service.notify import Notifier, watchdog_interval
from agent.service.report import changed_keys, identity, log_event, short_status, status_line
from agent.service.state import SafetyState, StateKeeper, restored_faults, state_directory
from agent.telemetry.link import FleetLink
from agent.telemetry.prometheus import MetricsExporter, serve
from agent.telemetry.topics import Topics
from agent.tub import TubRecorder, TubWriter

if TYPE_CHECKING:
    from agent.attest.client import AttestationClient
    from agent.bundle.store import ModelStore
    from agent.rollout.manager import Rollout

log = logging.getLogger("donkey-agent")

EXIT_OK, EXIT_FAILED, EXIT_DATAERR, EXIT_UNAVAILABLE, EXIT_CONFIG = 0, 1, 65, 69, 78
READY_TIMEOUT = 45.0
STOP_TIMEOUT = 5.0
PERSIST_INTERVAL = 0.05
POLICY_WAIT_S = 300.0  # attestation: how long a new model waits for the fleet to list it in its runtime policy
LIVE_KEYS = {"drive.max_throttle", "logging.level"}  # what SIGHUP can change without a restart

BuildHardware = Callable[[AgentConfig, ExitStack], tuple[Camera, Actuators]]


def attach_gpio(config: AgentConfig, core: DriveCore, stack: ExitStack) -> StatusLed | None:
    """The e-stop button sets its level on the core's stop board; the LED shows mode and faults."""
    gpio = config.gpio
    if gpio.estop_pin is None and gpio.status_led_pin is None:
        return None
    if gpio.pin_factory:
        os.environ["GPIOZERO_PIN_FACTORY"] = gpio.pin_factory
    try:
        if gpio.estop_pin is not None:
            stack.enter_context(closing(EStopButton(gpio.estop_pin, core.stops.source("button"))))
        if gpio.status_led_pin is not None:
            return stack.enter_context(closing(StatusLed(gpio.status_led_pin)))
    except Exception as exc:  # gpiozero raises its own hierarchy (BadPinFactory, PinInvalidPin, ...)
        raise HardwareUnavailableError(f"GPIO: {type(exc).__name__}: {exc}") from None
    return None


async def contained(job: Coroutine[Any, Any, None], what: str) -> None:
    """Run an optional service; if it fails, log it and keep driving (the car does not need it)."""
    try:
        await job
    except Exception:
        log.exception("%s failed; driving continues without it", what)


def apply_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


class Daemon:
    def __init__(self, config: AgentConfig, *, config_path: Path | None = None,
                 overrides: dict[str, Any] | None = None, duration: float | None = None,
                 record: Path | None = None, stream: TextIO = sys.stderr,
                 build: BuildHardware = build_hardware) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})  # command-line values: a reload keeps them
        self.duration = duration
        self.record = record if record is not None else config.recording.path
        self.stream = stream
        self.build = build
        self.notifier = Notifier()
        self.stop = asyncio.Event()
        self.reason = ""
        self.core: DriveCore | None = None
        self.fleet: FleetLink | None = None
        self.recorder: TubRecorder | None = None
        self.keeper: StateKeeper | None = None
        self.reload_lane = CommandLane("reload", capacity=4)
        self.link: Any = None  # the simulator link (TwinLink) when driving a simulator: its counters are reported
        self.attestation: AttestationClient | None = None
        self.rollout: Rollout | None = None
        self.watchdog_withheld = ""

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()

    async def run(self) -> int:
        if not log.isEnabledFor(logging.DEBUG):  # --verbose wins over the file
            apply_log_level(self.config.logging.level)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.signal_estop)
        state = SafetyState(state_directory(self.config))
        try:
            state.lock()
        except (OSError, RuntimeError) as exc:
            log.error("%s", exc)
            return EXIT_UNAVAILABLE
        try:
            return await self._run(state)
        finally:
            state.unlock()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(signum)

    def signal_estop(self) -> None:
        """SIGUSR1 (``donkey-agent estop``, ``systemctl kill -s USR1``): an e-stop from this machine."""
        if self.core is not None:
            self.core.stops.source("signal").press("SIGUSR1 (donkey-agent estop)")
            log.warning("e-stop requested by SIGUSR1")
            self._persist()

    async def _build(self, stack: ExitStack) -> tuple[Camera, Actuators] | None:
        """Open the hardware on a thread this loop does not wait for when asked to stop."""
        result: list[Any] = []

        def build() -> None:
            try:
                result.append(self.build(self.config, stack))
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=build, name="open-hardware", daemon=True)
        thread.start()
        while thread.is_alive():
            if self.stop.is_set():
                return None  # the process is ending; the OS closes whatever the thread opened
            await asyncio.sleep(0.05)
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    async def _run(self, state: SafetyState) -> int:
        notifier, config = self.notifier, self.config
        saved = state.load()
        restored = restored_faults(saved, after_crash=config.drive.after_crash)
        keeper = self.keeper = StateKeeper(state)
        try:
            clearance = self._attestation()
        except AttestationSetupError as exc:
            log.error("invalid config: %s", exc)
            return EXIT_CONFIG
        with ExitStack() as stack:
            notifier.status("starting: opening the camera and actuators")
            notifier.extend_timeout(30)
            parts = await self._build(stack)
            if parts is None:
                log.info("stopped (%s) while opening the hardware", self.reason)
                return EXIT_OK
            camera, actuators = parts
            self.link = getattr(camera, "link", None) or getattr(actuators, "link", None)  # the twin's, if any
            recorder = self._open_recorder(stack)
            store = self._model_store()
            model_path, model_kind, model_label = self._start_model(store)
            make_pilot = None
            if model_path is not None:
                num_threads = config.autopilot.num_threads

                def make_pilot() -> Autopilot:
                    return Autopilot(model_path, kind=model_kind, num_threads=num_threads)

            gated = NEEDS_PILOT if config.attestation.manual_without_token else frozenset(MODES)
            core = self.core = DriveCore(config.drive, DriveParts(camera, actuators, make_pilot, recorder, model_label),
                                         restored=restored, clearance=clearance, gated_modes=gated)
            core.lanes.add(self.reload_lane)
            if store is not None:
                self.rollout = self._make_rollout(store, core)
            if config.telemetry.url is not None:
                self.fleet = FleetLink(config.telemetry, identity(config),
                                       outbox_path=config.telemetry.outbox or state.directory / "outbox.db",
                                       lane=core.lanes.add(CommandLane("mqtt", capacity=32,
                                                                       rate_per_s=config.telemetry.command_rate_per_s,
                                                                       burst=20)),
                                       estop=core.stops.source("mqtt"),
                                       jobs=self.rollout.jobs if self.rollout else None,
                                       state_fields=self._state_fields)
                self._attach_fleet_attestation(self.fleet)
            stack.callback(core.stop, STOP_TIMEOUT)
            led = attach_gpio(config, core, stack)
            notifier.status("starting: loading the model and warming up")
            core.start()
            code = await self._warm_up(core)
            if code is not None:
                return code
            keeper.running = True
            self._persist()
            notifier.ready(short_status(core.status()))
            log.info("ready: %s", short_status(core.status()))
            stopped_cleanly = await self._drive(core, led)
            self._final_summary(core)
            if core.error is not None or not stopped_cleanly:
                return EXIT_FAILED  # the run marker stays "running": the next start treats this as a crash
            keeper.running = False
            self._persist()
            return EXIT_OK

    def _attestation(self) -> Clearance | None:
        """With ``attestation.require``: the gate fed by the fleet's tokens, and the clearance the core obeys."""
        config = self.config
        if not config.attestation.require:
            return None
        from agent.attest.client import AttestationClient  # cryptography: imported only when attestation is on

        clearance = Clearance()
        self.attestation = AttestationClient(config.attestation, fleet=config.telemetry.fleet,
                                             car=config.telemetry.car_id, clearance=clearance)
        log.info("attestation required: autonomous driving only with a valid token for Keylime agent %s",
                 self.attestation.uuid)
        return clearance

    async def _attestation_ticks(self, client: AttestationClient) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)
            client.tick()

    def _model_store(self) -> ModelStore | None:
        """The signed-model slots (docs/models.md), unless a model file was named for development (--model)."""
        if "autopilot.model" in self.overrides:
            return None
        from agent.bundle.stage import store_root
        from agent.bundle.store import ModelStore

        return ModelStore(store_root(self.config))

    def _start_model(self, store: ModelStore | None) -> tuple[Path | None, str, dict[str, Any] | None]:
        """The model the car starts with: the store's active bundle (verified when it was staged), else the
        configured file, which is unsigned: said loudly, it is for development."""
        autopilot = self.config.autopilot
        if store is not None:
            try:
                found = self._store_model(store)
            except (AgentError, OSError, ValueError) as exc:  # a damaged store: said, and never a traceback
                log.error("model store %s: %s; starting without its model", store.root, exc)
                found = None
            if found is not None:
                return found
        if autopilot.model is not None:
            log.warning("model: %s is an UNSIGNED model file (development only): a car in the fleet runs signed "
                        "bundles (donkey-agent model install; docs/models.md)", autopilot.model)
        return autopilot.model, autopilot.kind, None

    @staticmethod
    def _store_model(store: ModelStore) -> tuple[Path, str, dict[str, Any]] | None:
        from agent.bundle.stage import installed

        for action in store.recover():  # a crash in the middle of a slot change: finish or undo it first
            log.warning("model store: %s", action)
        active = store.slot("active")
        if active is None and store.slot("staged") is not None:
            # The car's first model (installed before it ever drove, e.g. by Ansible): nothing drives yet,
            # so it becomes active now, verified and smoke-tested as it was when it was staged.
            active = store.promote()
            log.info("model: the staged bundle is the car's first model: made active at start")
        if active is None:
            return None
        model = installed(active)
        digest = hashlib.sha256(model.model_path.read_bytes()).hexdigest()
        if digest != model.sha256:  # changed on disk since it was verified: never run it
            raise ValueError(f"{model.model_path}: sha256 {digest[:12]} is not the {model.sha256[:12]} it was "
                             "verified with")
        log.info("model: %s %s (sha256 %s, signed by %s), from the store", model.name, model.version,
                 model.sha256[:12], model.signer_key_id or "nobody: models.require_signed is off")
        return model.model_path, model.kind, {"name": model.name, "version": model.version, "sha256": model.sha256,
                                              "bundle_id": model.bundle_id}

    def _make_rollout(self, store: ModelStore, core: DriveCore) -> Rollout:
        from agent.bundle.stage import inbox_directory
        from agent.rollout.manager import Rollout, settings_from
        from agent.rollout.staging import stage_in_child

        config = self.config

        def stage(source: str, **kwargs: Any) -> Any:  # in a child process: the daemon never imports sigstore
            return stage_in_child(config, source, **kwargs)

        def load_pilot(path: Path, kind: str, threads: int | None = None) -> Autopilot:
            pilot = Autopilot(path, kind=kind, num_threads=threads or config.autopilot.num_threads)
            imu = np.zeros(6) if pilot.kind == "imu" else None  # warmed here, off the drive thread
            pilot.run(np.full((*pilot.image_shape[:2], 3), 128, np.uint8), imu=imu)
            pilot.reset()
            return pilot

        return Rollout(store, core, core.lanes.add(CommandLane("models", capacity=4)), settings_from(config),
                       stage=stage, load_pilot=load_pilot, inbox=inbox_directory(config),
                       frame_shape=(config.camera.height, config.camera.width))

    def _open_recorder(self, stack: ExitStack) -> TubRecorder | None:
        if self.record is None:
            return None
        writer = TubWriter(self.record, RECORD_INPUTS, RECORD_TYPES, metadata={"source": "donkey-agent run"})
        self.recorder = TubRecorder(writer, capacity=self.config.recording.queue)
        stack.callback(self.recorder.close)
        return self.recorder

    async def _warm_up(self, core: DriveCore) -> int | None:
        """Wait for the core to be ready, listening for stop; an exit code when it will not be."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not await asyncio.to_thread(core.wait_ready, 0.2):
            self.drain_events()
            if self.stop.is_set():
                log.info("stopped (%s) during warm-up", self.reason)
                await asyncio.to_thread(core.stop, STOP_TIMEOUT)
                self.drain_events()
                return EXIT_OK
            if core.stopped.is_set() or time.monotonic() > deadline:
                if core.error is None and not core.stopped.is_set():
                    log.error("the drive core did not become ready within %.0f s", READY_TIMEOUT)
                return EXIT_DATAERR if isinstance(core.error, ModelError) else EXIT_FAILED
            self.notifier.extend_timeout(5)
        self.drain_events()
        return None

    async def _drive(self, core: DriveCore, led: StatusLed | None) -> bool:
        fleet_stop = asyncio.Event()  # the fleet link outlives the core, to report its stop
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch_core(core), name="watch-core")
            tasks.create_task(self._report(core, led), name="report")
            tasks.create_task(self._keep_state(), name="keep-state")
            interval = watchdog_interval()
            if interval is not None:
                tasks.create_task(self._watchdog(core, interval), name="watchdog")
            if self.duration is not None:
                tasks.create_task(self._stop_after(self.duration), name="duration")
            if self.attestation is not None:
                tasks.create_task(self._attestation_ticks(self.attestation), name="attestation")
            if self.rollout is not None:
                rollout = self.rollout
                try:
                    await asyncio.to_thread(rollout.start)
                except Exception:  # optional, like the fleet link: the car drives on without model updates
                    log.exception("the model store could not be opened; model updates are off until a restart")
                else:
                    tasks.create_task(contained(rollout.run(self.stop), "the model rollout"), name="rollout")
            if self.fleet is not None:
                tasks.create_task(contained(self.fleet.run(fleet_stop, self._telemetry_status), "the fleet link"),
                                  name="fleet-link")
            if self.config.telemetry.prometheus:
                exporter = MetricsExporter(core, self._fleet_metrics)
                tasks.create_task(contained(serve(exporter, self.config.telemetry.prometheus, fleet_stop),
                                            "the metrics endpoint"), name="metrics")
            await self.stop.wait()
            self.notifier.stopping(f"stopping ({self.reason})")
            stopped_cleanly = await asyncio.to_thread(core.stop, STOP_TIMEOUT)
            self.drain_events()
            self._persist()
            if self.fleet is not None:
                with contextlib.suppress(Exception):
                    await self.fleet.flush(2.0)
            fleet_stop.set()
        return stopped_cleanly

    def _final_summary(self, core: DriveCore) -> None:
        if self.stream.isatty():
            self.stream.write("\n")
        summary = core.status()
        log.info("stopped (%s): %d cycles, %d deadline misses, %d frames missed, %d dropped; "
                 "period error p99 %s ms", self.reason or "drive core ended", summary["cycles"],
                 summary["deadline_misses"], summary["frames_missed"], summary["frames_dropped"],
                 summary.get("period_error_ms", {}).get("p99"))
        if self.link is not None:
            link = self.link.stats()
            bad = sum(link["bad_messages"].values()) + sum(link["framing"].values())
            if bad or link["reconnects"] or link["writes_dropped"]:
                log.warning("simulator link: %d reconnects, %d bad messages dropped (%s), %d writes dropped while "
                            "disconnected", link["reconnects"], bad,
                            ", ".join(f"{k} {v}" for k, v in {**link["bad_messages"], **link["framing"]}.items() if v)
                            or "none", link["writes_dropped"])
        if self.recorder is not None:
            self.recorder.close()  # idempotent (the stack closes it again): the counts are final now
            stats = self.recorder.stats()
            level = logging.WARNING if stats.get("lost") else logging.INFO
            log.log(level, "recorded %d records to %s (%d lost: %d dropped, %d rejected, %d failed to write)%s",
                    stats.get("written", 0), self.record, stats.get("lost", 0), stats.get("dropped", 0),
                    stats.get("rejected", 0), stats.get("failed", 0),
                    f"; last error: {stats['last_error']}" if stats.get("last_error") else "")

    def _telemetry_status(self) -> dict[str, Any]:
        assert self.core is not None
        status = self.core.status()
        if self.recorder is not None:
            status["recording_stats"] = self.recorder.stats()
        if self.attestation is not None:
            status["attestation"] = self.attestation.status()
        if self.rollout is not None:
            status["rollout"] = self.rollout.status()
        return status

    def _attach_fleet_attestation(self, fleet: FleetLink) -> None:
        """With attestation: token refreshes, and the policy sync (policy first, then the new model is opened)."""
        if self.attestation is None:
            return
        from agent.attest.policy_sync import PolicySync

        fleet.listeners[Topics(self.config.telemetry.fleet, self.config.telemetry.car_id).attestation] = \
            self.attestation.on_token
        self.attestation.publish = fleet.publish
        if self.rollout is None:
            return
        config = self.config.telemetry

        def publish(topic: str, payload: bytes) -> None:
            fleet.publish(topic, payload)  # not connected: dropped; wait_ready repeats the request

        sync = PolicySync(fleet=config.fleet, car=config.car_id, uuid=self.attestation.uuid, publish=publish)
        fleet.listeners[sync.ready_topic] = sync.on_ready

        async def policy_ready(staged: Any) -> bool:
            request = sync.request({str(staged.model_path.resolve()): [staged.sha256]})
            try:
                return await sync.wait_ready(request, POLICY_WAIT_S)
            finally:
                sync.forget(request)

        self.rollout.policy_ready = policy_ready

    def _state_fields(self) -> dict[str, Any]:
        """The retained state's changing part: the model that drives (and the store's slots), attestation."""
        fields: dict[str, Any] = {}
        if self.core is not None:
            sha256 = self.core.status()["model"].get("sha256")
            if sha256:
                fields["model_sha256"] = sha256
        if self.rollout is not None:
            status = self.rollout.status()
            fields["models"] = {key: status[key] for key in ("active", "previous", "pending", "phase")}
        if self.attestation is not None:
            fields["attestation"] = self.attestation.status()["state"]
        return fields

    def _fleet_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.fleet is not None:
            metrics.update(self.fleet.stats())
        if self.recorder is not None:
            stats = self.recorder.stats()
            metrics.update({f"donkey_recording_{k}": float(v) for k, v in stats.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})
        if self.link is not None:
            link = self.link.stats()
            metrics.update({"donkey_sim_link_connected": float(link["connected"]),
                            "donkey_sim_link_reconnects_total": float(link["reconnects"]),
                            "donkey_sim_link_bad_messages_total": float(sum(link["bad_messages"].values())),
                            "donkey_sim_link_writes_dropped_total": float(link["writes_dropped"])})
        return metrics

    def drain_events(self) -> None:
        core = self.core
        if core is None:
            return
        queues = [core.events, core.deadman.events]
        if self.attestation is not None:
            queues.append(self.attestation.events)
        if self.rollout is not None:
            queues.append(self.rollout.events)
        for queue in queues:
            for event in queue.drain():
                if self.rollout is not None and queue is core.events:
                    self.rollout.observe(event)
                log_event(event)
                if self.fleet is not None:
                    self.fleet.record(event)

    def _persist(self) -> None:
        """Write what must survive a restart: the latched faults, and presses the core has not latched yet."""
        core, keeper = self.core, self.keeper
        if core is None or keeper is None:
            return
        snapshot = core.snapshot
        latched = {name: snapshot.faults.get(name, "") for name in snapshot.latched}
        for source in core.stops.sources:
            if source.presses > source.seen and source.last is not None and "estop" not in latched:
                latched["estop"] = f"e-stop from {source.name}: {source.last.reason}"
        stall = core.deadman.tripped  # the core is stuck and has not latched it yet: keep it across a restart
        if stall:
            latched.setdefault("drive_stall", stall)
        keeper.update(latched, snapshot.moving, time.monotonic())

    async def _keep_state(self) -> None:
        while not self.stop.is_set():
            self._persist()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), PERSIST_INTERVAL)

    async def _stop_after(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        self.request_stop(f"duration of {seconds:g} s reached")

    async def _watch_core(self, core: DriveCore) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.1)
            if core.stopped.is_set():
                self.request_stop("the drive core ended")

    async def _report(self, core: DriveCore, led: StatusLed | None) -> None:
        tty = self.stream.isatty()
        last_status = last_log = 0.0
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.25)
            self.drain_events()
            status = core.status()
            now = time.monotonic()
            if led is not None:
                led.show(status["mode"], status["faults"])
            if now - last_status >= 1.0:
                self.notifier.status(short_status(status))
                last_status = now
            if tty:
                self.stream.write("\r" + status_line(status) + "\033[K")
                self.stream.flush()
            elif now - last_log >= 5.0 and not self.notifier.enabled:
                log.info("%s", status_line(status))
                last_log = now

    async def _watchdog(self, core: DriveCore, interval: float) -> None:
        """Ping only while the core is healthy and this loop is on time."""
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            expected = loop.time() + interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), interval)
            lag = loop.time() - expected
            problem = core.health(core.clock())
            if not problem and lag > interval:
                problem = f"the event loop is {lag:.1f} s late"
            if problem:
                if problem != self.watchdog_withheld:
                    log.error("withholding the watchdog: %s", problem)
                self.watchdog_withheld = problem
                continue
            self.watchdog_withheld = ""
            self.notifier.watchdog()

    def reload(self) -> None:
        """SIGHUP: apply what can change live; name what needs a restart; keep going on a bad file.

        The file is read with the command-line overrides applied again, so a reload never undoes
        one (``--max-throttle 0.1`` stays 0.1), and only keys whose values really changed are named.
        """
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload (started without one)")
            return
        try:
            new = load(self.config_path)
            if self.overrides:
                new = new.with_overrides(self.overrides)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running config, the file is invalid:\n%s", exc)
            return
        changed = changed_keys(self.config, new)
        live = [k for k in changed if k in LIVE_KEYS]
        if "drive.max_throttle" in live and self.core is not None:
            refusal = self.reload_lane.submit(SetMaxThrottle(value=new.drive.max_throttle))
            if refusal:
                log.error("SIGHUP: drive.max_throttle not applied: %s", refusal)
        if "logging.level" in live:
            apply_log_level(new.logging.level)
        restart = [k for k in changed if k not in LIVE_KEYS]
        log.info("SIGHUP: reloaded %s; applied live: %s; needs a restart: %s", self.config_path,
                 ", ".join(live) or "nothing", ", ".join(restart) or "nothing")
        self.config = self.config.model_copy(update={"drive": self.config.drive.model_copy(
            update={"max_throttle": new.drive.max_throttle}), "logging": new.logging}) if live else self.config


def run(config: AgentConfig, *, config_path: Path | None = None, overrides: dict[str, Any] | None = None,
        duration: float | None = None, record: Path | None = None, stream: TextIO = sys.stderr) -> int:
    daemon = Daemon(config, config_path=config_path, overrides=overrides, duration=duration, record=record,
                    stream=stream)
    return asyncio.run(daemon.run())
