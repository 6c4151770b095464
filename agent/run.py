"""``donkey-agent run``: the asyncio supervisor around the drive core, on a terminal or under systemd.

The event loop owns I/O and lifecycles (signals, sd_notify, logs, the status line); the drive
core runs on its own thread and never waits on this loop. Every task lives in one TaskGroup
and stops on the same event: SIGTERM/SIGINT, the requested duration, or the core ending.
``READY=1`` goes out only once the core is warm (camera streaming, first inference done,
actuators at neutral); ``WATCHDOG=1`` only while the core cycles and its outputs are accepted
(see ``DriveCore.health``) and this loop is responsive, never tied to any network link.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any, TextIO

from agent.config import AgentConfig, ConfigError, load
from agent.core.drive import RECORD_INPUTS, RECORD_TYPES, DriveCore, DriveParts
from agent.core.handoff import Command, Event
from agent.hw.factory import HardwareUnavailableError, build_hardware
from agent.hw.gpio import EStopButton, StatusLed
from agent.hw.interfaces import Actuators, Camera
from agent.pilot import Autopilot, ModelError
from agent.service.notify import Notifier, watchdog_interval
from agent.telemetry.prometheus import MetricsExporter, serve
from agent.telemetry.service import TelemetryService
from agent.tub import TubRecorder, TubWriter

log = logging.getLogger("donkey-agent")

EXIT_OK, EXIT_FAILED, EXIT_DATAERR, EXIT_UNAVAILABLE, EXIT_CONFIG = 0, 1, 65, 69, 78
READY_TIMEOUT = 45.0
STOP_TIMEOUT = 5.0
LIVE_KEYS = {"drive.max_throttle", "logging.level"}  # what SIGHUP can change without a restart

BuildHardware = Callable[[AgentConfig, ExitStack], tuple[Camera, Actuators]]


def log_event(event: Event) -> None:
    detail = ", ".join(f"{k}={v}" for k, v in event.detail.items() if v not in (None, ""))
    level = logging.WARNING if event.kind == "fault" or (event.kind == "command" and not event.detail.get("ok")) \
        else logging.INFO
    if event.kind == "stopped" and event.detail.get("error"):
        level = logging.ERROR
    log.log(level, "%s: %s", event.kind, detail)


def status_line(status: dict[str, Any]) -> str:
    period = status.get("period_error_ms", {})
    age = status.get("frame_age_ms", {})
    invoke = status.get("invoke_ms", {})
    faults = ", ".join(status["faults"]) or "none"
    return (f"{status['mode']:11s} {status.get('rate_hz', 0):5.1f} Hz | period err p99 {period.get('p99', 0):5.2f} ms"
            f" | frame age p50 {age.get('p50', 0):5.1f} ms | invoke p50 {invoke.get('p50', 0):5.2f} ms"
            f" | steer {status['steering']:+.2f} throttle {status['throttle']:+.2f} | faults: {faults}")


def short_status(status: dict[str, Any]) -> str:
    """systemd's STATUS=: what `systemctl status` shows on one line."""
    faults = ", ".join(status["faults"]) or "none"
    p99 = status.get("period_error_ms", {}).get("p99", 0)
    return f"{status['mode']}, {status.get('rate_hz', 0):.1f} Hz, p99 period error {p99:.2f} ms, faults: {faults}"


def attach_gpio(config: AgentConfig, core: DriveCore, stack: ExitStack) -> StatusLed | None:
    """The e-stop button feeds the core's command queue; the LED shows mode and faults."""
    gpio = config.gpio
    if gpio.estop_pin is None and gpio.status_led_pin is None:
        return None
    if gpio.pin_factory:
        os.environ["GPIOZERO_PIN_FACTORY"] = gpio.pin_factory
    try:
        if gpio.estop_pin is not None:
            stack.enter_context(closing(EStopButton(gpio.estop_pin, core.commands)))
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


def identity(config: AgentConfig) -> dict[str, Any]:
    """What the retained birth message says about this agent."""
    from agent import __version__

    model = config.autopilot.model
    model_sha = hashlib.sha256(model.read_bytes()).hexdigest() if model is not None and model.exists() else None
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    digest = hashlib.sha256(config.model_dump_json(exclude={"source"}).encode()).hexdigest()[:16]
    return {"car_id": config.telemetry.car_id, "fleet": config.telemetry.fleet, "agent_version": __version__,
            "model_sha256": model_sha, "boot_id": boot_id, "config_digest": digest, "pid": os.getpid(),
            "started_at": round(time.time(), 3)}


def apply_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def changed_keys(old: AgentConfig, new: AgentConfig) -> list[str]:
    def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    a, b = flatten(old.model_dump(exclude={"source"})), flatten(new.model_dump(exclude={"source"}))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class Supervisor:
    def __init__(self, config: AgentConfig, *, config_path: Path | None = None, duration: float | None = None,
                 record: Path | None = None, stream: TextIO = sys.stderr,
                 build: BuildHardware = build_hardware) -> None:
        self.config = config
        self.config_path = config_path
        self.duration = duration
        self.record = record
        self.stream = stream
        self.build = build
        self.notifier = Notifier()
        self.stop = asyncio.Event()
        self.reason = ""
        self.core: DriveCore | None = None
        self.telemetry: TelemetryService | None = None
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
        try:
            return await self._run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    async def _run(self) -> int:
        notifier = self.notifier
        with ExitStack() as stack:
            notifier.status("starting: opening the camera and actuators")
            notifier.extend_timeout(30)
            camera, actuators = await asyncio.to_thread(self.build, self.config, stack)
            recorder = None
            if self.record is not None:
                writer = TubWriter(self.record, RECORD_INPUTS, RECORD_TYPES, metadata={"source": "donkey-agent run"})
                recorder = TubRecorder(writer, capacity=self.config.recording.queue)
                stack.callback(recorder.close)
            autopilot = self.config.autopilot
            make_pilot = None
            if autopilot.model is not None:
                model_path = autopilot.model

                def make_pilot() -> Autopilot:
                    return Autopilot(model_path, kind=autopilot.kind, num_threads=autopilot.num_threads)

            if self.config.telemetry.url is not None:
                self.telemetry = TelemetryService(self.config.telemetry, identity(self.config))
            core = self.core = DriveCore(self.config.drive, DriveParts(camera, actuators, make_pilot, recorder))
            if self.telemetry is not None:
                self.telemetry.attach(core)
            stack.callback(core.stop, STOP_TIMEOUT)
            led = attach_gpio(self.config, core, stack)
            notifier.status("starting: loading the model and warming up")
            core.start()
            deadline = time.monotonic() + READY_TIMEOUT
            while not await asyncio.to_thread(core.wait_ready, 1.0):
                if core.stopped.is_set() or time.monotonic() > deadline:
                    self.drain_events()
                    if core.error is None:
                        log.error("the drive core did not become ready within %.0f s", READY_TIMEOUT)
                    return EXIT_DATAERR if isinstance(core.error, ModelError) else EXIT_FAILED
                notifier.extend_timeout(5)
            self.drain_events()
            notifier.ready(short_status(core.status()))
            log.info("ready: %s", short_status(core.status()))

            fleet_stop = asyncio.Event()  # the fleet link outlives the core, to report its stop
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._watch_core(core), name="watch-core")
                tasks.create_task(self._report(core, led), name="report")
                interval = watchdog_interval()
                if interval is not None:
                    tasks.create_task(self._watchdog(core, interval), name="watchdog")
                if self.duration is not None:
                    tasks.create_task(self._stop_after(self.duration), name="duration")
                if self.telemetry is not None:
                    tasks.create_task(contained(self.telemetry.run(fleet_stop, core.status), "the fleet link"),
                                      name="fleet-link")
                if self.config.telemetry.prometheus:
                    exporter = MetricsExporter(core, self._fleet_metrics)
                    tasks.create_task(contained(serve(exporter, self.config.telemetry.prometheus, fleet_stop),
                                                "the metrics endpoint"), name="metrics")
                await self.stop.wait()
                notifier.stopping(f"stopping ({self.reason})")
                stopped_cleanly = await asyncio.to_thread(core.stop, STOP_TIMEOUT)
                self.drain_events()
                if self.telemetry is not None:
                    await self.telemetry.flush(2.0)
                fleet_stop.set()

            if self.stream.isatty():
                self.stream.write("\n")
            summary = core.status()
            log.info("stopped (%s): %d cycles, %d deadline misses, %d frames missed, %d dropped; "
                     "period error p99 %s ms", self.reason or "drive core ended", summary["cycles"],
                     summary["deadline_misses"], summary["frames_missed"], summary["frames_dropped"],
                     summary.get("period_error_ms", {}).get("p99"))
            if recorder is not None:
                log.info("recorded %d records to %s (%d dropped)", recorder.written + recorder.backlog,
                         self.record, recorder.dropped)
            if core.error is not None or not stopped_cleanly:
                return EXIT_FAILED
            return EXIT_OK

    def _fleet_metrics(self) -> dict[str, float]:
        if self.telemetry is None:
            return {}
        return {"donkey_outbox_events": len(self.telemetry.outbox),
                "donkey_outbox_dropped": self.telemetry.outbox.dropped,
                "donkey_broker_connected": int(self.telemetry.connected.is_set())}

    def drain_events(self) -> None:
        if self.core is not None:
            for event in self.core.events.drain():
                log_event(event)
                if self.telemetry is not None:
                    self.telemetry.record(event)
                    if event.kind == "command" and event.detail.get("source") == "mqtt":
                        self.telemetry.command_result(event)

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
        """SIGHUP: apply what can change live; name what needs a restart; keep going on a bad file."""
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload (started without one)")
            return
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running config, the file is invalid:\n%s", exc)
            return
        changed = changed_keys(self.config, new)
        live = [k for k in changed if k in LIVE_KEYS]
        if "drive.max_throttle" in live and self.core is not None:
            self.core.commands.push(Command("set_max_throttle", new.drive.max_throttle, source="reload"))
        if "logging.level" in live:
            apply_log_level(new.logging.level)
        restart = [k for k in changed if k not in LIVE_KEYS]
        log.info("SIGHUP: reloaded %s; applied live: %s; needs a restart: %s", self.config_path,
                 ", ".join(live) or "nothing", ", ".join(restart) or "nothing")


def run(config: AgentConfig, *, config_path: Path | None = None, duration: float | None = None,
        record: Path | None = None, stream: TextIO = sys.stderr) -> int:
    supervisor = Supervisor(config, config_path=config_path, duration=duration, record=record, stream=stream)
    return asyncio.run(supervisor.run())
