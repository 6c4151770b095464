"""The drive core: camera -> autopilot -> safety -> actuators on one dedicated thread.

Each cycle: take a frame that no earlier cycle used (or none), apply queued commands, run
the model on the new frame, let the supervisor judge frame age, inference health, the
operator heartbeat and the actuators, then actuate: the command, or neutral while any
fault is active. Timings go into a preallocated ring (``LoopMetrics``), state changes into
a bounded event queue; nothing in the loop logs, awaits or waits on the network.

Pacing: ``camera`` runs a cycle as each frame arrives (waking early enough to catch a frame
that goes stale); ``timer`` runs on absolute deadlines and takes the newest unused frame.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config import DriveConfig
from agent.core.control import MODES, NEEDS_OPERATOR, NEEDS_PILOT, ThrottleRamp, select
from agent.core.handoff import Command, CommandQueue, Event, EventQueue
from agent.core.metrics import INDEX, LoopMetrics
from agent.core.ratekeeper import RateKeeper
from agent.core.realtime import GcControl, RealtimeReport, configure_realtime
from agent.core.safety import LATCHED, Fault, Supervisor
from agent.hw.interfaces import ActuatorError, Actuators, Camera, Frame
from agent.pilot import Autopilot
from agent.tub import TubRecorder

FIRST_FRAME_TIMEOUT = 15.0  # s: camera start-up (a simulator may still be loading)
RECORD_INPUTS = ("cam/image_array", "user/angle", "user/throttle", "user/mode", "pilot/angle", "pilot/throttle")
RECORD_TYPES = ("image_array", "float", "float", "str", "float", "float")


def sleep_until(target: float, clock: Callable[[], float]) -> None:
    """Sleep to about a millisecond before ``target``, then spin: the thread holds the CPU (and
    usually the GIL) at the moment it must act, instead of waking up late behind other threads."""
    remaining = target - clock()
    if remaining > 0.0015:
        time.sleep(remaining - 0.001)
    while clock() < target:
        pass


class DriveStartError(RuntimeError):
    """The core could not start: no first frame, a model that does not load, actuators that fail."""


@dataclass
class DriveParts:
    camera: Camera
    actuators: Actuators
    make_pilot: Callable[[], Autopilot] | None = None  # called inside the drive thread
    recorder: TubRecorder | None = None


class DriveCore:
    def __init__(
        self,
        config: DriveConfig,
        parts: DriveParts,
        *,
        events: EventQueue | None = None,
        commands: CommandQueue | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.parts = parts
        self.events = events or EventQueue()
        self.commands = commands or CommandQueue()
        self.metrics = LoopMetrics()
        self.supervisor = Supervisor(self.events, clear_hold=config.fault_clear_hold_ms / 1000.0)
        self.clock = clock
        self.mode = config.mode
        self.max_throttle = config.max_throttle
        self.pilot: Autopilot | None = None
        self.keeper: RateKeeper | None = None  # timer pacing: its lag and skipped periods go into status()
        self.realtime: RealtimeReport | None = None
        self.heartbeat = 0.0  # clock() at the end of the last cycle: the watchdog's view of liveness
        self.last_output = (0.0, 0.0)  # what the actuators were last told
        self.last_write_ok = 0.0  # clock() of the last write the actuators accepted
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._user = (0.0, 0.0)
        self._user_time = -math.inf
        self._pilot_out = (0.0, 0.0)
        self.recording = parts.recorder is not None  # a `record` command turns it off and on
        self._ramp = ThrottleRamp(config.throttle_ramp_per_s)
        self._gc = GcControl(config.realtime.freeze_gc)
        self._thread = threading.Thread(target=self._run, name="drive-core", daemon=True)

    # -- lifecycle (called from other threads) -----------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """True once warm: camera streaming, first inference done, actuators at neutral."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.stopped.is_set() or time.monotonic() > deadline:
                return False
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the loop; the actuators are left at neutral. Returns False if the thread did not end."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def health(self, now: float) -> str:
        """Why the core is not healthy, or "" when it is: alive, cycling, and its outputs accepted.

        ``now`` is on the core's clock. A core waiting for frames still cycles (at least once
        per max frame age), so a silent heartbeat means a hung thread, not a missing camera.
        """
        if not self.alive or not self.ready.is_set():
            return "the drive core is not running"
        limit = 2 * max(1.0 / self.config.rate_hz, self.config.max_frame_age_ms / 1000.0) + 0.2
        if now - self.heartbeat > limit:
            return f"the drive core has not completed a cycle for {now - self.heartbeat:.1f} s"
        if now - self.last_write_ok > limit:
            return f"the actuators have not accepted a command for {now - self.last_write_ok:.1f} s"
        return ""

    @property
    def latched(self) -> bool:
        """A fault that needs an explicit clear is active."""
        return any(fault in LATCHED for fault in self.supervisor.active)

    def status(self) -> dict[str, Any]:
        """A snapshot for STATUS=, the terminal line and telemetry (reader side; copies)."""
        summary = self.metrics.summary(200)
        return {
            "mode": self.mode,
            "faults": sorted(f.value for f in self.supervisor.active),
            "max_throttle": self.max_throttle,
            "recording": self.recording,
            "lagging": bool(self.keeper and self.config.pacing == "timer" and self.keeper.lagging),
            "missed_periods": self.keeper.missed_periods if self.keeper else 0,
            "steering": self.last_output[0],
            "throttle": self.last_output[1],
            **summary,
        }

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        actuators = self.parts.actuators
        try:
            self.realtime = configure_realtime(self.config.realtime)
            self.events.push(Event("realtime", self.realtime.as_dict()))
            if self.parts.make_pilot is not None:
                self.pilot = self.parts.make_pilot()
            if self.mode in NEEDS_PILOT and self.pilot is None:
                raise DriveStartError(f"mode {self.mode!r} needs an autopilot model (autopilot.model)")
            actuators.arm()
            self.last_write_ok = self.clock()
            first = self.parts.camera.read(-1, FIRST_FRAME_TIMEOUT)
            if first is None:
                raise DriveStartError(f"no camera frame within {FIRST_FRAME_TIMEOUT:.0f} s")
            if self.pilot is not None:
                self.pilot.run(first.image, imu=first.imu)  # warm-up inference, not actuated
                self.pilot.reset()
            self._gc.freeze()
            self.heartbeat = self.clock()
            self.events.push(Event("started", {"mode": self.mode, "pacing": self.config.pacing,
                                               "rate_hz": self.config.rate_hz,
                                               "model": str(self.pilot.path) if self.pilot else None,
                                               "kind": self.pilot.kind if self.pilot else None}))
            self.ready.set()
            self._loop(first)
        except BaseException as exc:  # report every way out; the finally puts the car in neutral
            self.error = exc
            self.events.push(Event("stopped", {"error": f"{type(exc).__name__}: {exc}"}))
        else:
            self.events.push(Event("stopped", {"error": None, "cycles": self.metrics.cycles}))
        finally:
            self._gc.release()
            try:
                actuators.neutral()
                self.last_output = (0.0, 0.0)
            except ActuatorError as exc:
                self.events.push(Event("fault", {"fault": Fault.ACTUATOR_FAILURE.value,
                                                 "detail": f"neutral at stop failed: {exc}", "latched": True}))
            self.stopped.set()

    def _loop(self, first: Frame) -> None:
        config, camera, clock = self.config, self.parts.camera, self.clock
        period = 1.0 / config.rate_hz
        max_age = config.max_frame_age_ms / 1000.0
        budget = config.inference_budget_ms / 1000.0
        heartbeat_timeout = config.heartbeat_timeout_ms / 1000.0
        timer_paced = config.pacing == "timer"
        output_delay = config.output_delay_ms / 1000.0
        tick = 0.0
        keeper = self.keeper = RateKeeper(config.rate_hz, clock=clock)
        metrics, supervisor, pilot = self.metrics, self.supervisor, self.pilot
        last_seq, frame_time = first.seq, first.timestamp
        previous_actuation = clock()
        self._ramp.reset(previous_actuation)
        overruns = 0

        while not self._stop.is_set():
            start = clock()
            if timer_paced:
                keeper.wait()
                tick = keeper.next_deadline - period
                frame = camera.read(last_seq, 0.0)
            else:
                # Wake on the next frame, or the moment the newest one turns stale (then go
                # neutral at once), and while stale once a period to keep re-checking.
                until_stale = frame_time + max_age - start
                timeout = until_stale + 0.001 if until_stale > 0 else period
                frame = camera.read(last_seq, timeout)
            now = clock()
            row = metrics.row()
            row[INDEX["start"]] = now
            row[INDEX["wait_ms"]] = (now - start) * 1e3
            self._apply_commands(now)

            new_frame = frame is not None and frame.seq > last_seq
            if frame is not None and new_frame:
                if frame.seq > last_seq + 1:
                    metrics.frames_dropped += frame.seq - last_seq - 1
                last_seq, frame_time = frame.seq, frame.timestamp
            else:
                metrics.frames_missed += 1
            age = now - frame_time
            supervisor.observe(Fault.STALE_FRAME, age > max_age, now, "newest camera frame too old")

            preprocess = invoke = 0.0
            if frame is not None and new_frame and pilot is not None and self.mode in NEEDS_PILOT:
                t0 = clock()
                failure = ""
                try:
                    pilot.prepare(frame.image, imu=frame.imu)
                    t1 = clock()
                    pilot.invoke()
                    t2 = clock()
                    output = pilot.result()
                    self._pilot_out = (output.angle, output.throttle)
                except Exception as exc:  # any model failure means neutral, never a crash
                    t1 = t2 = clock()
                    failure = f"{type(exc).__name__}: {exc}"
                preprocess, invoke = (t1 - t0), (t2 - t1)
                overruns = overruns + 1 if invoke > budget else 0
                overrun = overruns >= config.overrun_limit
                supervisor.observe(Fault.INFERENCE_ERROR, bool(failure), now, failure)
                supervisor.observe(Fault.INFERENCE_OVERRUN, overrun, now,
                                   f"{overruns} inferences over {config.inference_budget_ms:.0f} ms" if overrun else "")
            elif self.mode not in NEEDS_PILOT:
                supervisor.observe(Fault.INFERENCE_ERROR, False, now)
                supervisor.observe(Fault.INFERENCE_OVERRUN, False, now)
            supervisor.observe(Fault.HEARTBEAT_LOST,
                               self.mode in NEEDS_OPERATOR and now - self._user_time > heartbeat_timeout, now,
                               "no manual control received")

            if supervisor.ok:
                steering, target = select(self.mode, *self._pilot_out, *self._user, max_throttle=self.max_throttle,
                                          throttle_multiplier=config.throttle_multiplier)
                throttle = self._ramp.apply(target, now)
            else:
                steering, throttle = 0.0, 0.0
                self._ramp.reset(now)
            computed = clock()
            if output_delay > 0 and supervisor.ok:
                # Fixed output time: the tick, or the frame's capture, plus the delay. (Neutral for a
                # fault goes out at once.)
                anchor = tick if timer_paced else (frame.timestamp if frame is not None and new_frame else now)
                sleep_until(anchor + output_delay, clock)
            actuation = clock()  # the command goes to the hardware now
            self._actuate(steering, throttle, now)
            done = clock()

            row[INDEX["preprocess_ms"]] = preprocess * 1e3
            row[INDEX["invoke_ms"]] = invoke * 1e3
            row[INDEX["wait_ms"]] += (actuation - computed) * 1e3
            row[INDEX["actuate_ms"]] = (done - actuation) * 1e3
            row[INDEX["overhead_ms"]] = (computed - now - invoke) * 1e3  # the loop's own work up to the write
            row[INDEX["frame_age_ms"]] = (actuation - frame_time) * 1e3
            row[INDEX["period_error_ms"]] = abs(actuation - previous_actuation - period) * 1e3
            late = (done - now) > period
            row[INDEX["deadline_miss"]] = 1.0 if late else 0.0
            row[INDEX["steering"]] = steering
            row[INDEX["throttle"]] = throttle
            row[INDEX["actuated"]] = actuation
            row[INDEX["frame_seq"]] = last_seq
            row[INDEX["decided"]] = 1.0 if invoke > 0.0 else 0.0
            if late:
                metrics.deadline_misses += 1
            metrics.publish()
            previous_actuation = actuation
            self.heartbeat = done

            if new_frame and frame is not None and self.recording and self.parts.recorder is not None:
                self.parts.recorder.submit({
                    "cam/image_array": frame.image, "user/angle": self._user[0], "user/throttle": self._user[1],
                    "user/mode": self.mode, "pilot/angle": self._pilot_out[0], "pilot/throttle": self._pilot_out[1],
                })
            self._gc.collect_in_slack()

    def _actuate(self, steering: float, throttle: float, now: float) -> None:
        actuators = self.parts.actuators
        for attempt in (1, 2):  # one retry, then neutral and a latched fault
            try:
                actuators.write(steering, throttle)
                self.last_output = (steering, throttle)
                self.last_write_ok = now
                return
            except ActuatorError as exc:
                if attempt == 2:
                    self.supervisor.latch(Fault.ACTUATOR_FAILURE, now, str(exc))
        try:
            actuators.neutral()
            self.last_output = (0.0, 0.0)
            self.last_write_ok = now
        except ActuatorError:
            pass  # already latched; keep trying neutral every cycle

    # -- commands ------------------------------------------------------------------------------
    def _apply_commands(self, now: float) -> None:
        while (command := self.commands.pop()) is not None:
            ok, reason = self._apply(command, now)
            if command.name != "user" or not ok:
                self.events.push(Event("command", {"name": command.name, "id": command.id, "source": command.source,
                                                   "ok": ok, "reason": reason}, now))

    def _apply(self, command: Command, now: float) -> tuple[bool, str]:
        name, value = command.name, command.value
        if name == "user":
            angle, throttle = value
            if not (math.isfinite(angle) and math.isfinite(throttle)):
                return False, "non-finite manual control"
            self._user = (max(-1.0, min(1.0, angle)), max(-1.0, min(1.0, throttle)))
            self._user_time = command.monotonic
            return True, ""
        if name == "estop":
            pressed = value is None or bool(value)
            if pressed:
                self.supervisor.estop_held = value is not None  # a button; None = a one-shot command
                self.supervisor.latch(Fault.ESTOP, now, f"e-stop from {command.source}")
            else:
                self.supervisor.estop_held = False
            return True, ""
        if name == "clear_fault":
            fault = None
            if value is not None:
                try:
                    fault = Fault(value)
                except ValueError:
                    return False, f"unknown fault {value!r}"
            refused = self.supervisor.clear(fault, now, command.source)
            return (not refused), "; ".join(refused)
        if name == "set_mode":
            if value not in MODES:
                return False, f"unknown mode {value!r}; modes: {', '.join(MODES)}"
            if value in NEEDS_PILOT and self.pilot is None:
                return False, f"mode {value!r} needs an autopilot model"
            if value != self.mode:
                self.events.push(Event("mode", {"from": self.mode, "to": value, "source": command.source}, now))
                self.mode = value
                if self.pilot is not None:
                    self.pilot.reset()
            return True, ""
        if name == "set_max_throttle":
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                return False, "max throttle must be a number in [0, 1]"
            self.max_throttle = float(value)
            return True, ""
        if name == "record":
            if self.parts.recorder is None:
                return False, "no recording configured (recording.path or --record)"
            self.recording = value == "start"
            return True, ""
        if name == "set_behavior":
            if self.pilot is None:
                return False, "no autopilot"
            try:
                self.pilot.set_behavior(int(value))
            except (ValueError, TypeError) as exc:
                return False, str(exc)
            return True, ""
        return False, f"unknown command {name!r}"
