"""``donkey-agent run``: start the drive core on the configured hardware and supervise it.

The main thread owns the lifecycle and I/O (signals, logs, the status line); the drive core
runs on its own thread. Ctrl-C or SIGTERM stops the core, which leaves the car at neutral.
(The systemd-managed asyncio supervisor of issue 4 replaces this loop; the core is the same.)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any, TextIO

from agent.config import AgentConfig
from agent.core.drive import RECORD_INPUTS, RECORD_TYPES, DriveCore, DriveParts
from agent.core.handoff import Event
from agent.hw.factory import HardwareUnavailableError, build_hardware
from agent.hw.gpio import EStopButton, StatusLed
from agent.pilot import Autopilot, ModelError
from agent.tub import TubRecorder, TubWriter

log = logging.getLogger("donkey-agent")

EXIT_OK, EXIT_FAILED, EXIT_DATAERR, EXIT_UNAVAILABLE, EXIT_CONFIG = 0, 1, 65, 69, 78
READY_TIMEOUT = 45.0


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


def run(config: AgentConfig, *, duration: float | None = None, record: Path | None = None,
        stream: TextIO = sys.stderr) -> int:
    stop = threading.Event()
    reason = {"why": ""}

    def on_signal(signum: int, _frame: object) -> None:
        reason["why"] = signal.Signals(signum).name
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ExitStack() as stack:
            camera, actuators = build_hardware(config, stack)
            recorder = None
            if record is not None:
                writer = TubWriter(record, RECORD_INPUTS, RECORD_TYPES, metadata={"source": "donkey-agent run"})
                recorder = TubRecorder(writer, capacity=config.recording.queue)
                stack.callback(recorder.close)
            autopilot = config.autopilot
            make_pilot = None
            if autopilot.model is not None:
                model_path = autopilot.model

                def make_pilot() -> Autopilot:
                    return Autopilot(model_path, kind=autopilot.kind, num_threads=autopilot.num_threads)

            core = DriveCore(config.drive, DriveParts(camera, actuators, make_pilot, recorder))
            stack.callback(core.stop)
            led = attach_gpio(config, core, stack)
            core.start()
            if not core.wait_ready(READY_TIMEOUT):
                for event in core.events.drain():
                    log_event(event)
                core.stop()
                if core.error is None:
                    log.error("the drive core did not become ready within %.0f s", READY_TIMEOUT)
                return EXIT_DATAERR if isinstance(core.error, ModelError) else EXIT_FAILED
            started = time.monotonic()
            tty = stream.isatty()
            last_report = 0.0
            while not stop.wait(0.25):
                for event in core.events.drain():
                    log_event(event)
                if core.stopped.is_set():
                    break
                now = time.monotonic()
                if led is not None:
                    status = core.status()
                    led.show(status["mode"], status["faults"])
                if tty:
                    stream.write("\r" + status_line(core.status()) + "\033[K")
                    stream.flush()
                elif now - last_report >= 5.0:
                    log.info("%s", status_line(core.status()))
                    last_report = now
                if duration is not None and now - started >= duration:
                    reason["why"] = f"duration of {duration:g} s reached"
                    break
            if tty:
                stream.write("\n")
            stopped_cleanly = core.stop()
            for event in core.events.drain():
                log_event(event)
            summary = core.status()
            log.info("stopped (%s): %d cycles, %d deadline misses, %d frames missed, %d dropped; "
                     "period error p99 %s ms", reason["why"] or "drive core ended", summary["cycles"],
                     summary["deadline_misses"], summary["frames_missed"], summary["frames_dropped"],
                     summary.get("period_error_ms", {}).get("p99"))
            if recorder is not None:
                log.info("recorded %d records to %s (%d dropped)", recorder.written + recorder.backlog,
                         record, recorder.dropped)
            if core.error is not None or not stopped_cleanly:
                return EXIT_FAILED
            return EXIT_OK
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
