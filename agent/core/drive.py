"""The drive core: camera -> autopilot -> safety -> actuators on one dedicated thread.

Each cycle is three steps, as in openpilot's controlsd:

1. **read inputs**: wait for the cycle (never spinning), take the frame no earlier cycle used,
   the e-stop requests on the ``StopBoard``, the commands waiting in each lane, and run the
   model on the new frame;
2. **decide** (``Decider``, agent/core/decide.py): pure rules, inputs and time in, the actuator
   command out: the car's own command, or neutral while any fault is active;
3. **publish**: write the actuators, a row of the preallocated metrics ring, an immutable
   ``DriveStatus`` snapshot for every other thread, and the record for the tub.

Nothing in the loop logs, awaits, or waits on the network or a disk. Pacing (agent/core/pacing.py):
``locked`` (the default) has one output slot per frame the camera's clock predicts and writes
each on time; ``camera`` runs a cycle per frame (waking early enough to catch a frame that goes
stale, and once a period while stale); ``timer`` runs on absolute deadlines and takes the newest
unused frame. Whichever, a cycle starts at most once per period while frames are missing, so a
dead or hostile camera cannot make the thread spin. Between two cycles the core may take a new
model (``SwapPilot``, only while the car is stopped) and offers each decided frame to a shadow
trial (``ShadowTap``), neither of which it ever waits on.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import DriveConfig
from agent.core.commands import Command, CommandLane, CommandLanes
from agent.core.control import NEEDS_PILOT
from agent.core.deadman import Deadman
from agent.core.decide import CycleInputs, Decider, Inference, describe_pilot
from agent.core.faults import Fault
from agent.core.handoff import Clearance, Event, EventQueue, ManualControl
from agent.core.metrics import INDEX, LoopMetrics
from agent.core.pacing import make_pacer, sleep_coarse
from agent.core.ratekeeper import RateKeeper
from agent.core.realtime import GcControl, RealtimeReport, configure_realtime
from agent.core.safety import FaultMonitor
from agent.core.shadow import ShadowTap
from agent.core.stops import StopBoard
from agent.errors import AgentError
from agent.hw.interfaces import Actuators, Camera, Frame
from agent.pilot import Autopilot
from agent.tub import TubRecorder

FIRST_FRAME_TIMEOUT = 15.0  # s: camera start-up (a simulator may still be loading)
RECORD_INPUTS = ("cam/image_array", "user/angle", "user/throttle", "user/mode", "pilot/angle", "pilot/throttle")
RECORD_TYPES = ("image_array", "float", "float", "str", "float", "float")


def sleep_until(target: float, clock: Callable[[], float]) -> None:
    """Sleep to about a millisecond before ``target``, then spin: the thread holds the CPU (and
    usually the GIL) at the moment it must act, instead of waking up late behind other threads.
    Used only for the output time of a command (at most 1 ms a cycle), never while faulted."""
    remaining = target - clock()
    if remaining > 0.0015:
        time.sleep(remaining - 0.001)
    while clock() < target:
        pass


class DriveStartError(AgentError, RuntimeError):
    """The core could not start: no first frame, a model that does not load, actuators that fail."""


@dataclass
class DriveParts:
    camera: Camera
    actuators: Actuators
    make_pilot: Callable[[], Autopilot] | None = None  # called inside the drive thread
    recorder: TubRecorder | None = None
    model_label: Mapping[str, Any] | None = None  # what make_pilot loads (a bundle's name, version, sha256)


@dataclass(frozen=True, slots=True)
class DriveStatus:
    """What the drive thread published at the end of its latest cycle. Other threads read this
    (one reference read) and never the core's live state; nothing in it is mutated afterwards."""

    mode: str
    faults: Mapping[str, str]  # active fault -> why
    latched: tuple[str, ...]
    max_throttle: float
    recording: bool
    steering: float
    throttle: float
    moving: bool  # no fault, and a non-zero throttle was written
    estop_held_by: str  # a source still holding its e-stop level, or ""
    published: float  # monotonic


class DriveCore:
    def __init__(
        self,
        config: DriveConfig,
        parts: DriveParts,
        *,
        events: EventQueue | None = None,
        stops: StopBoard | None = None,
        restored: Mapping[Fault, str] | None = None,
        clearance: Clearance | None = None,
        gated_modes: frozenset[str] = NEEDS_PILOT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.parts = parts
        self.clock = clock
        self.events = events or EventQueue()
        self.stops = stops or StopBoard(clock)
        self.lanes = CommandLanes()
        self.local_commands = self.lanes.add(CommandLane("local", capacity=64))
        self.manual = ManualControl()
        self.metrics = LoopMetrics()
        self.faults = FaultMonitor(self.events, clear_hold=config.fault_clear_hold_ms / 1000.0,
                                   estop_hold=config.estop_hold_ms / 1000.0)
        # With a clearance (attestation.require), the modes in ``gated_modes`` drive only while it allows.
        self.clearance = clearance
        self.decider = Decider(config, self.faults, self.events, can_record=parts.recorder is not None,
                               gated_modes=gated_modes if clearance is not None else frozenset())
        self.restored = dict(restored or {})
        self.period = 1.0 / config.rate_hz
        self.deadman_limit = config.deadman_periods * self.period
        self.deadman = Deadman(self, parts.actuators, period=self.period, priority=config.realtime.priority,
                               clock=clock)
        self.pacer = make_pacer(config, self._read, self._promise, clock, self.deadman_limit)
        self.shadow: ShadowTap | None = None  # set by the agent while a candidate model runs in shadow
        self.keeper: RateKeeper | None = None  # timer pacing: its lag and skipped periods go into status()
        self.realtime: RealtimeReport | None = None
        self.heartbeat = 0.0  # clock() at the end of the last cycle: the watchdog's view of liveness
        self.alive_until = math.inf  # the drive thread's promise to the dead-man monitor
        self.last_write_ok = 0.0  # clock() of the last write the actuators accepted
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._faults_version = -1
        self.snapshot = self._make_snapshot(0.0, 0.0, 0.0)
        self._gc = GcControl(config.realtime.freeze_gc)
        self._thread = threading.Thread(target=self._run, name="drive-core", daemon=True)

    @property
    def pilot(self) -> Autopilot | None:
        """The active autopilot: the decider holds it, so a SwapPilot between cycles changes it in one place."""
        return self.decider.pilot

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

    def thread_cpu_s(self) -> float:
        """CPU seconds the drive thread has used, from the kernel (utime + stime); 0 when unknown."""
        tid = self._thread.native_id
        if tid is None:
            return 0.0
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def submit(self, command: Command) -> str:
        """Hand a command to the core from the local lane; "" on success, else why it was refused."""
        return self.local_commands.submit(command)

    def health(self, now: float) -> str:
        """Why the core is not healthy, or "" when it is: alive, cycling, and its outputs accepted.

        ``now`` is on the core's clock. The core cycles at least once a period even without
        frames, so a silent heartbeat means a hung thread, not a missing camera.
        """
        if not self.alive or not self.ready.is_set():
            return "the drive core is not running"
        limit = 2 * max(self.period, self.config.max_frame_age_ms / 1000.0) + 0.2
        if now - self.heartbeat > limit:
            return f"the drive core has not completed a cycle for {now - self.heartbeat:.1f} s"
        if now - self.last_write_ok > limit:
            return f"the actuators have not accepted a command for {now - self.last_write_ok:.1f} s"
        return ""

    @property
    def ok(self) -> bool:
        """No fault is active (from the published snapshot)."""
        return not self.snapshot.faults

    @property
    def latched(self) -> bool:
        """A fault that needs an explicit clear is active (from the published snapshot)."""
        return bool(self.snapshot.latched)

    def status(self) -> dict[str, Any]:
        """A snapshot for STATUS=, the terminal line and telemetry (reader side; copies)."""
        snapshot = self.snapshot
        keeper = self.keeper
        return {
            "mode": snapshot.mode,
            "faults": sorted(snapshot.faults),
            "latched": list(snapshot.latched),
            "max_throttle": snapshot.max_throttle,
            "recording": snapshot.recording,
            "estop_held_by": snapshot.estop_held_by,
            "lagging": bool(keeper and self.config.pacing == "timer" and keeper.lagging),
            "missed_periods": keeper.missed_periods if keeper else 0,
            "pacing": {"mode": self.config.pacing, **self.pacer.status()},
            "model": dict(self.decider.model_label),
            "steering": snapshot.steering,
            "throttle": snapshot.throttle,
            "events_dropped": self.events.dropped,
            "deadman_trips": self.deadman.trips,
            "drive_thread_cpu_s": round(self.thread_cpu_s(), 2),
            "commands": self.lanes.stats(),
            **self.metrics.summary(200),
        }

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        actuators = self.parts.actuators
        try:
            self.realtime = configure_realtime(self.config.realtime)
            self.events.push(Event("realtime", self.realtime.as_dict()))
            if self.parts.make_pilot is not None:
                self.decider.pilot = self.parts.make_pilot()
                self.decider.model_label = dict(self.parts.model_label or describe_pilot(self.decider.pilot))
            if self.decider.mode in NEEDS_PILOT and self.pilot is None:
                raise DriveStartError(f"mode {self.decider.mode!r} needs an autopilot model (autopilot.model)")
            now = self.clock()
            for fault, detail in self.restored.items():
                self.faults.restore(fault, detail, now)
            actuators.arm()
            self.last_write_ok = self.clock()
            first = self._first_frame()
            if first is None:
                return  # asked to stop while waiting
            if self.pilot is not None:
                self.pilot.run(first.image, imu=first.imu)  # warm-up inference, not actuated
                self.pilot.reset()
            self._gc.freeze()
            self.heartbeat = self.clock()
            self._publish_snapshot(0.0, 0.0, self.heartbeat)
            self.events.push(Event("started", {"mode": self.decider.mode, "pacing": self.config.pacing,
                                               "rate_hz": self.config.rate_hz,
                                               "model": str(self.pilot.path) if self.pilot else None,
                                               "kind": self.pilot.kind if self.pilot else None,
                                               "model_label": self.decider.model_label,
                                               "faults": sorted(self.snapshot.faults)}))
            self.alive_until = self.heartbeat + self.deadman_limit
            self.ready.set()
            self.deadman.start()
            self._loop(first)
        except BaseException as exc:  # report every way out; the finally puts the car in neutral
            self.error = exc
            self.events.push(Event("stopped", {"error": f"{type(exc).__name__}: {exc}"}))
        else:
            self.events.push(Event("stopped", {"error": None, "cycles": self.metrics.cycles}))
        finally:
            self.deadman.stop()
            self._gc.release()
            try:
                actuators.neutral()
            except Exception as exc:  # the finally must finish: report and go on
                self.events.push(Event("fault", {"fault": Fault.ACTUATOR_FAILURE.value,
                                                 "detail": f"neutral at stop failed: {exc}", "latched": True}))
            self.snapshot = self._make_snapshot(0.0, 0.0, self.clock())
            self.stopped.set()

    def _first_frame(self) -> Frame | None:
        """Wait for the camera's first frame, listening for stop; None when asked to stop."""
        deadline = self.clock() + FIRST_FRAME_TIMEOUT
        while not self._stop.is_set():
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise DriveStartError(f"no camera frame within {FIRST_FRAME_TIMEOUT:.0f} s")
            started = self.clock()
            frame, _ = self._read(-1, min(0.1, remaining))
            if frame is not None:
                return frame
            sleep_coarse(started + min(0.1, remaining), self.clock)  # a camera that returns at once
        return None

    def _read(self, after_seq: int, timeout: float) -> tuple[Frame | None, str]:
        """The camera's next frame; an exception becomes a reason (a camera_error fault), never a crash."""
        try:
            return self.parts.camera.read(after_seq, max(0.0, timeout)), ""
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"[:200]

    def _promise(self, moment: float) -> None:
        self.alive_until = moment

    def _loop(self, first: Frame) -> None:
        clock, decider, metrics, pacer = self.clock, self.decider, self.metrics, self.pacer
        period = self.period
        pacer.start(first)
        self.keeper = pacer.keeper
        last_seq, frame_time = first.seq, first.timestamp
        previous_actuation = last_cycle = clock()
        decider.restart_ramp(previous_actuation)

        while not self._stop.is_set():
            # 1. read inputs
            start = clock()
            wake = pacer.wait(last_seq, frame_time, last_cycle)
            frame, camera_error = wake.frame, wake.camera_error
            now = last_cycle = clock()
            self.alive_until = now + self.deadman_limit  # awake: this cycle must finish within the limit
            row = metrics.row()
            row[INDEX["start"]] = now
            row[INDEX["wait_ms"]] = (now - start) * 1e3
            if self.clearance is not None:
                decider.clearance = self.clearance.latest  # one reference read: the gate's newest verdict
            decider.accept_stops(self.stops.new_requests(), now, stall=self.deadman.acknowledge())
            held_by = self.stops.held_by()  # once a cycle: the clear gate and the snapshot both use it
            self._apply_commands(now, held_by)
            new_frame = frame is not None and frame.seq > last_seq
            if frame is not None and new_frame:
                if frame.seq > last_seq + 1:
                    metrics.frames_dropped += frame.seq - last_seq - 1
                last_seq, frame_time = frame.seq, frame.timestamp
            else:
                metrics.frames_missed += 1
            inference = self._infer(frame) if frame is not None and new_frame and decider.wants_pilot else None
            shadow = self.shadow
            if shadow is not None and inference is not None and frame is not None and not inference.failure:
                shadow.offer(frame, inference)  # one reference and a counter write: never waits

            # 2. decide
            decision = decider.decide(CycleInputs(now, now - frame_time, camera_error, inference,
                                                  self.manual.latest))

            # 3. publish
            computed = clock()
            if new_frame:
                pacer.computed(computed - now)
            if wake.output_at > computed and decision.ok:
                sleep_until(wake.output_at, clock)  # a fixed phase; neutral for a fault goes out at once
            actuation = clock()
            steering, throttle = self._actuate(decision.steering, decision.throttle, now)
            done = clock()

            invoke = inference.invoke_s if inference is not None else 0.0
            row[INDEX["preprocess_ms"]] = inference.prepare_s * 1e3 if inference is not None else 0.0
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
            row[INDEX["decided"]] = 1.0 if inference is not None else 0.0
            if late:
                metrics.deadline_misses += 1
            metrics.publish()
            previous_actuation = actuation
            self.heartbeat = done
            self.alive_until = done + period + self.deadman_limit
            self._publish_snapshot(steering, throttle, done, held_by)

            if new_frame and frame is not None and decider.recording and self.parts.recorder is not None:
                manual = self.manual.latest
                self.parts.recorder.submit({
                    "cam/image_array": frame.image, "user/angle": manual[0], "user/throttle": manual[1],
                    "user/mode": decider.mode, "pilot/angle": decider.pilot_output[0],
                    "pilot/throttle": decider.pilot_output[1],
                })
            self._gc.collect_in_slack()

    def _infer(self, frame: Frame) -> Inference:
        pilot = self.pilot
        assert pilot is not None
        clock = self.clock
        t0 = clock()
        try:
            pilot.prepare(frame.image, imu=frame.imu)
            t1 = clock()
            pilot.invoke()
            t2 = clock()
            output = pilot.result()
            return Inference(output.angle, output.throttle, t2 - t1, t1 - t0)
        except Exception as exc:  # any model failure means neutral, never a crash
            return Inference(invoke_s=clock() - t0, failure=f"{type(exc).__name__}: {exc}"[:200])

    def _apply_commands(self, now: float, held_by: str) -> None:
        for lane in self.lanes:
            while (command := lane.take()) is not None:
                self.decider.apply(command, now, held_by=held_by)

    def _actuate(self, steering: float, throttle: float, now: float) -> tuple[float, float]:
        """Write the command (one retry, then a latched fault and neutral); returns what was written."""
        actuators = self.parts.actuators
        if self.deadman.tripped:  # the monitor saw a stall this cycle has not latched yet
            steering = throttle = 0.0
        for attempt in (1, 2):
            try:
                actuators.write(steering, throttle)
                self.last_write_ok = now
                return steering, throttle
            except Exception as exc:  # ActuatorError, or a backend's bug: the same for the car
                if attempt == 2:
                    self.faults.latch(Fault.ACTUATOR_FAILURE, now, f"{type(exc).__name__}: {exc}"[:200])
        try:
            actuators.neutral()
            self.last_write_ok = now
        except Exception:  # already latched; neutral is tried again every cycle
            pass
        return 0.0, 0.0

    def _publish_snapshot(self, steering: float, throttle: float, now: float, held_by: str | None = None) -> None:
        self.snapshot = self._make_snapshot(steering, throttle, now, held_by)

    def _make_snapshot(self, steering: float, throttle: float, now: float, held_by: str | None = None) -> DriveStatus:
        faults = self.faults
        if faults.version != self._faults_version:  # build the fault views only when they change
            self._faults_version = faults.version
            self._fault_view: Mapping[str, str] = faults.active()
            self._latched_view = tuple(sorted(faults.latched_faults()))
        decider = self.decider
        return DriveStatus(decider.mode, self._fault_view, self._latched_view, decider.max_throttle,
                           decider.recording, steering, throttle, faults.ok and throttle != 0.0,
                           self.stops.held_by() if held_by is None else held_by, now)
