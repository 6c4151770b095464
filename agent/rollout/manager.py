"""The model rollout on a running car, on the agent's event loop: staged -> shadow -> stopped -> active -> probation.

A bundle arrives (the fleet's ``model_update`` command, the inbox directory, or ``donkey-agent model install``
before a start) and is verified, smoke-tested and put in the store's staged slot by agent/bundle (in a worker
thread: it never blocks this loop, and never touches the drive thread). Then, one phase at a time:

1. **shadow** (optional): the candidate runs beside the active model on the same live frames (agent/rollout/
   shadow.py); it goes on only if the configured criteria pass, else it is discarded;
2. **waiting for stop**: the candidate is loaded and warmed here, off the drive thread, and offered to the core
   as a ``SwapPilot``; the core applies it between two cycles only while the car is stopped, and refuses it
   otherwise, so a pending update waits (and says so) and can never be forced while the car moves;
3. **active**: the store's slots move (staged -> active -> previous) only after the core took the model, so after a
   crash the car starts with whichever model the store says is active, never a half-installed one;
4. **probation**: model faults within the window roll it back to the previous model, again only when stopped
   (a model fault has already put the car in neutral).

Every step is an event (``model``) with the bundle's name, version and digest; ``status()`` gives the active,
previous and pending models and the phase, for telemetry and the retained state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bundle.stage import InstalledModel, StagedModel, installed
from agent.bundle.store import ModelStore
from agent.config import AgentConfig
from agent.core.commands import Command, CommandLane, Outcome, SwapPilot
from agent.core.handoff import Event, EventQueue
from agent.core.shadow import ShadowTap
from agent.rollout.commands import ModelRollback, ModelUpdate
from agent.rollout.probation import Probation, ProbationLimits
from agent.rollout.shadow import ShadowCriteria, ShadowTrial

log = logging.getLogger("donkey-agent.rollout")

TICK_S = 0.25
RETRY_SWAP_S = 1.0  # how often a waiting model is offered to the core again
INBOX_EVERY_S = 2.0


@dataclass(frozen=True)
class RolloutSettings:
    shadow: bool = True  # trial a candidate in shadow before it may drive
    shadow_criteria: ShadowCriteria = field(default_factory=ShadowCriteria)
    shadow_timeout_s: float = 300.0  # a trial without a verdict by then is rejected (e.g. the car never drove)
    probation: ProbationLimits = field(default_factory=ProbationLimits)


def settings_from(config: AgentConfig) -> RolloutSettings:
    rollout = config.models.rollout
    criteria = ShadowCriteria(min_frames=rollout.shadow_min_frames,
                              max_steering_error_mean=rollout.max_steering_error_mean,
                              max_steering_error_max=rollout.max_steering_error_max,
                              max_throttle_error_mean=rollout.max_throttle_error_mean,
                              max_throttle_error_max=rollout.max_throttle_error_max,
                              max_invoke_ms_p99=config.drive.inference_budget_ms)
    limits = ProbationLimits(window_s=rollout.probation_s,
                             max_inference_errors=rollout.probation_max_inference_errors,
                             max_inference_overruns=rollout.probation_max_inference_overruns,
                             max_drive_stalls=rollout.probation_max_drive_stalls)
    return RolloutSettings(rollout.shadow, criteria, rollout.shadow_timeout_s, limits)


def label(model: StagedModel | InstalledModel) -> dict[str, Any]:
    return {"name": model.name, "version": model.version, "sha256": model.sha256, "bundle_id": model.bundle_id}


class Rollout:
    def __init__(self, store: ModelStore, core: Any, lane: CommandLane, settings: RolloutSettings, *,  # core: DriveCore
                 stage: Callable[..., Any], load_pilot: Callable[..., Any], inbox: Path | None = None,
                 policy_ready: Callable[[StagedModel], Any] | None = None,
                 frame_shape: tuple[int, int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.core = core
        self.lane = lane  # to the drive core (SwapPilot)
        self.jobs = CommandLane("jobs", capacity=4)  # from the fleet (model_update, model_rollback)
        self.settings = settings
        # (source: path or URL, sha256=, size=, on_step=): into the staged slot, or raises; in a worker thread
        self.stage = stage
        self.load_pilot = load_pilot  # (model path, kind[, threads]) -> a warmed Autopilot, in a worker thread
        self.inbox = inbox
        self.policy_ready = policy_ready  # attestation: await the fleet's policy for a digest before opening it
        self.frame_shape = frame_shape  # (height, width) of this car's camera frames
        self.clock = clock
        self.events = EventQueue(256)
        self.phase = "idle"
        self.detail = ""
        self.pending: StagedModel | None = None
        self.candidate: Any = None  # the pending model's loaded interpreter (the one the core will get)
        self.trial: ShadowTrial | None = None
        self.probation: Probation | None = None
        self.rolling_back = ""  # why, while a rollback waits for the car to stop
        self._swap: SwapPilot | None = None
        self._swap_at = 0.0
        self._waiting_said = ""
        self._busy: asyncio.Task[Any] | None = None  # staging or loading, one at a time
        self._jobs: list[Command] = []  # fleet commands whose outcome waits on the phase they started
        self._phase_since = clock()
        self._slots: dict[str, dict[str, Any] | None] = {}

    # -- reporting ------------------------------------------------------------------------------
    def _event(self, step: str, model: dict[str, Any] | None = None, **detail: Any) -> None:
        flat = {"step": step, **{f"model_{k}": v for k, v in (model or {}).items()}, **detail}
        self.events.push(Event("model", {k: v for k, v in flat.items() if v is not None}))
        log.info("model %s: %s", step, ", ".join(f"{k}={v}" for k, v in flat.items() if k != "step"))

    def _set_phase(self, phase: str, detail: str = "") -> None:
        self.phase, self.detail, self._phase_since = phase, detail, self.clock()

    def _refresh_slots(self) -> None:
        slots: dict[str, dict[str, Any] | None] = {}
        for name, slot in self.store.slots().items():
            try:
                slots[name] = label(installed(slot)) if slot is not None else None
            except Exception as exc:  # an unreadable manifest: say so, never crash the rollout
                slots[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        self._slots = slots

    def status(self) -> dict[str, Any]:
        """The models and the phase (telemetry, the retained state); copies."""
        status: dict[str, Any] = {"phase": "" if self.phase == "idle" else self.phase, "detail": self.detail,
                                  "active": self._slots.get("active"), "previous": self._slots.get("previous"),
                                  "pending": label(self.pending) if self.pending else None}
        if self.trial is not None:
            status["shadow"] = self.trial.summary()
        if self.probation is not None:
            status["probation"] = self.probation.verdict(self.clock())[1]
        return status

    def observe(self, event: Event) -> None:
        """A drive-core event (the daemon forwards them all): probation counts model faults."""
        if self.probation is not None:
            self.probation.observe(event)

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover the store after a crash and pick up a staged bundle left by the CLI or an earlier run."""
        for action in self.store.recover():
            self._event("recovered", detail=action)
        self._refresh_slots()
        staged = self.store.slot("staged")
        if staged is not None:
            try:
                model = installed(staged)
            except Exception as exc:
                self._event("refused", detail=f"the staged bundle is unreadable: {exc}")
                self.store.discard_staged()
            else:
                self._event("resumed", label(model), detail="a staged model from before this start")
                self.pending = _staged_from(model)  # run() begins its trial (start() may run in a worker thread)

    # -- the loop -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        next_inbox = 0.0
        if self.pending is not None and self._busy is None and self.phase == "idle":
            self._begin(self.pending)
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), TICK_S)
                while (job := self.jobs.take()) is not None:
                    self._take(job)
                now = self.clock()
                if self.inbox is not None and now >= next_inbox and self._busy is None and self.pending is None:
                    next_inbox = now + INBOX_EVERY_S
                    self._scan_inbox()
                self._advance(now)
                self._answer_jobs()
        finally:
            self._stop_trial()
            if self._busy is not None:
                self._busy.cancel()

    def _take(self, job: Command) -> None:
        now = self.clock()
        if now > job.expires:  # answered "timeout" by the fleet link already
            return
        if isinstance(job, ModelUpdate):
            if self._busy is not None or self.pending is not None or self.rolling_back:
                job.outcome = Outcome(False, f"refused: a model update is in progress ({self.phase}: "
                                             f"{self.detail or 'staging'})")
                return
            self._jobs.append(job)
            self._busy = asyncio.create_task(self._stage_from_url(job), name="model-stage")
        elif isinstance(job, ModelRollback):
            self._jobs.append(job)
            self._request_rollback("requested by the fleet", job)

    def _scan_inbox(self) -> None:
        from agent.bundle.stage import inbox_bundles

        assert self.inbox is not None
        bundles = inbox_bundles(self.inbox)
        if bundles:
            self._busy = asyncio.create_task(self._stage_from_inbox(bundles[0]), name="model-stage")

    async def _stage_from_url(self, job: ModelUpdate) -> None:
        self._set_phase("staging", f"{job.url} version {job.version}")
        self._event("update_requested", detail=job.url, version=job.version, sha256=job.sha256, size=job.size)
        try:
            staged = await asyncio.to_thread(self._stage, job.url, sha256=job.sha256, size=job.size)
        except Exception as exc:
            self._refused(str(exc), job)
            return
        finally:
            self._busy = None
        self._staged(staged, job)

    async def _stage_from_inbox(self, bundle: Path) -> None:
        self._set_phase("staging", str(bundle))
        self._event("inbox", detail=str(bundle))
        try:
            staged = await asyncio.to_thread(self._stage, str(bundle))
        except Exception as exc:
            self._refused(str(exc), None)
            _set_aside(bundle, "rejected", str(exc))
            return
        finally:
            self._busy = None
        _set_aside(bundle, "done", "")
        self._staged(staged, None)

    def _stage(self, source: str, *, sha256: str | None = None, size: int | None = None) -> StagedModel:
        """Stage (in a worker thread) and describe what the staged slot now holds."""
        self.stage(source, sha256=sha256, size=size, on_step=self._on_stage_step)
        return self._stage_from_slot()

    def _stage_from_slot(self) -> StagedModel:
        slot = self.store.slot("staged")
        if slot is None:
            raise RuntimeError("staging reported success, but the staged slot is empty")
        return _staged_from(installed(slot))

    def _on_stage_step(self, step: str, detail: dict[str, Any]) -> None:
        """From the staging thread: every step (a progress report only every ~10 %) becomes an event."""
        if detail.get("status") == "progress":
            total, done = detail.get("total") or 0, detail.get("bytes") or 0
            if not total or int(10 * done / total) == int(10 * (done - 1) / total):
                return
        self.events.push(Event("model_stage", {"step": step, **{k: v for k, v in detail.items()
                                                                  if isinstance(v, str | int | float | bool)}}))

    def _refused(self, why: str, job: Command | None) -> None:
        self._set_phase("idle")
        self._event("refused", detail=why[:300])
        if job is not None:
            job.outcome = Outcome(False, why[:300])
            self._jobs = [j for j in self._jobs if j is not job]

    def _staged(self, staged: StagedModel, job: Command | None) -> None:
        self.pending = staged
        self._refresh_slots()
        self._event("staged", label(staged), signer=staged.signer_key_id, invoke_p99_ms=staged.smoke.invoke_p99_ms)
        if job is not None:  # the fleet's request is done: the rest (shadow, activation) are events
            job.outcome = Outcome(True, f"staged {staged.name} {staged.version}; it becomes active when the car is "
                                        "stopped" + (" and its shadow trial passes" if self.settings.shadow else ""))
            self._jobs = [j for j in self._jobs if j is not job]
        self._begin(staged)

    def _begin(self, staged: StagedModel) -> None:
        self._busy = asyncio.get_running_loop().create_task(self._load(staged), name="model-load")

    async def _load(self, staged: StagedModel) -> None:
        """Load (and warm) the candidate off the drive thread, after the fleet's policy lists it (attestation)."""
        self._set_phase("loading", f"{staged.name} {staged.version}")
        shape = tuple(staged.manifest.input_shape[:2])
        if self.frame_shape is not None and shape != self.frame_shape:
            self._busy = None
            self._discard(f"the model takes {shape[0]}x{shape[1]} frames; this car's camera gives "
                          f"{self.frame_shape[0]}x{self.frame_shape[1]}")
            return
        try:
            if self.policy_ready is not None:
                self._set_phase("waiting_for_policy", f"the fleet's runtime policy must list {staged.sha256[:12]}")
                if not await self.policy_ready(staged):
                    raise RuntimeError("the fleet did not confirm the runtime policy for the new model in time")
            self.candidate = await asyncio.to_thread(self.load_pilot, staged.model_path, staged.kind)
        except Exception as exc:
            self._busy = None
            self._discard(f"cannot load it: {exc}")
            return
        self._busy = None
        if self.settings.shadow:
            tap = ShadowTap()
            # One interpreter thread: it runs on the shadow thread itself (at nice 10), where a worker pool made
            # here would run at the agent's priority and compete with the drive thread's own invoke.
            shadow_pilot = await asyncio.to_thread(self.load_pilot, staged.model_path, staged.kind, 1)
            self.trial = ShadowTrial(tap, shadow_pilot, self.settings.shadow_criteria, label(staged))
            self.trial.start()
            self.core.shadow = tap
            self._set_phase("shadow", f"{staged.name} {staged.version} beside the active model")
            self._event("shadow_started", label(staged))
        else:
            self._set_phase("waiting_for_stop", "offered to the drive core while the car is stopped")

    def _stop_trial(self) -> None:
        if self.trial is not None:
            self.core.shadow = None
            self.trial.stop()
            self.trial.tap.close()

    def _discard(self, why: str) -> None:
        staged = self.pending
        self._stop_trial()
        self.trial = None
        self.candidate = None
        self.pending = None
        with contextlib.suppress(Exception):
            self.store.discard_staged()
        self._refresh_slots()
        self._set_phase("idle")
        self._event("rejected", label(staged) if staged else None, detail=why[:300])

    # -- the state machine ----------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        if self.phase == "shadow" and self.trial is not None:
            passed, reasons = self.trial.verdict()
            if passed is None and now - self._phase_since > self.settings.shadow_timeout_s:
                passed, reasons = False, [f"no verdict within {self.settings.shadow_timeout_s:g} s: {reasons[0]}"]
            if passed is None:
                self.detail = reasons[0]
                return
            summary = self.trial.summary()
            self._stop_trial()
            self.trial = None
            assert self.pending is not None
            if not passed:
                self._discard("shadow trial failed: " + "; ".join(reasons))
                return
            self._event("shadow_passed", label(self.pending), frames=summary["frames"],
                        steering_error_mean=summary["steering_error_mean"],
                        throttle_error_mean=summary["throttle_error_mean"],
                        candidate_invoke_p99_ms=summary["candidate_invoke_ms"]["p99"])
            self._set_phase("waiting_for_stop", "offered to the drive core while the car is stopped")
        if self.phase == "waiting_for_stop" and self.pending is not None:
            self._offer(now, self.candidate, label(self.pending), self._activated)
        elif self.phase == "probation" and self.probation is not None:
            verdict, why = self.probation.verdict(now)
            if verdict == "passed":
                self._event("probation_passed", self.probation.label, detail=why)
                self.probation = None
                self._set_phase("idle")
            elif verdict == "rollback":
                self.probation = None
                self._request_rollback(why, None)
        if self.phase == "rolling_back":
            self._advance_rollback(now)

    def _offer(self, now: float, pilot: Any, model: dict[str, Any], done: Callable[[SwapPilot], None]) -> None:
        """Offer ``pilot`` to the core (again every RETRY_SWAP_S while it refuses because the car moves)."""
        swap = self._swap
        if swap is not None and swap.outcome is None:
            return  # the core has not looked at it yet
        if swap is not None and swap.outcome is not None:
            self._swap = None
            if swap.outcome.ok:
                done(swap)
                return
            if swap.outcome.reason != self._waiting_said:  # say why it waits, once per reason
                self._waiting_said = swap.outcome.reason
                self._event("activation_waiting", model, detail=swap.outcome.reason)
            self.detail = swap.outcome.reason
        if now - self._swap_at < RETRY_SWAP_S:
            return
        self._swap_at = now
        command = SwapPilot(pilot=pilot, label=model)
        refusal = self.lane.submit(command)
        if not refusal:
            self._swap = command

    def _activated(self, swap: SwapPilot) -> None:
        staged = self.pending
        assert staged is not None
        self.store.promote()  # only now: until the core took it, the active slot stays the model that drives
        self._refresh_slots()
        self._release(swap)
        self._waiting_said = ""
        self.pending, self.candidate = None, None
        self._event("activated", label(staged))
        self.probation = Probation(label(staged), self.clock(), self.settings.probation)
        self._set_phase("probation", f"{self.settings.probation.window_s:g} s")

    def _release(self, swap: SwapPilot) -> None:
        """The replaced interpreter dies here, on this loop's thread, never on the drive thread."""
        swap.replaced = None

    # -- rollback -------------------------------------------------------------------------------
    def _request_rollback(self, why: str, job: Command | None) -> None:
        previous = self._slots.get("previous")
        if previous is None or "error" in previous:
            self._event("rollback_refused", detail=f"{why}; but there is no previous model to return to")
            if job is not None:
                job.outcome = Outcome(False, "no previous model to roll back to")
                self._jobs = [j for j in self._jobs if j is not job]
            return
        if self.pending is not None or self.trial is not None:
            self._discard(f"superseded by a rollback ({why})")
        self.rolling_back = why
        self.candidate = None
        self._set_phase("rolling_back", why)
        self._event("rollback_started", previous, detail=why)
        slot = self.store.slot("previous")
        assert slot is not None
        model = installed(slot)
        self._busy = asyncio.get_running_loop().create_task(self._load_previous(model), name="model-load")

    async def _load_previous(self, model: InstalledModel) -> None:
        try:
            self.candidate = await asyncio.to_thread(self.load_pilot, model.model_path, model.kind)
        except Exception as exc:
            self._event("rollback_failed", label(model), detail=f"cannot load the previous model: {exc}")
            self.rolling_back = ""
            self._set_phase("idle")
            self._fail_jobs(ModelRollback, f"cannot load the previous model: {exc}")
        finally:
            self._busy = None

    def _advance_rollback(self, now: float) -> None:
        previous = self._slots.get("previous")
        if self.candidate is None or previous is None:
            return
        self._offer(now, self.candidate, previous, self._rolled_back)

    def _rolled_back(self, swap: SwapPilot) -> None:
        self.store.rollback()
        self._refresh_slots()
        self._release(swap)
        self._waiting_said = ""
        self.candidate = None
        self._event("rolled_back", self._slots.get("active"), detail=self.rolling_back)
        self.rolling_back = ""
        self._set_phase("idle")
        for job in [j for j in self._jobs if isinstance(j, ModelRollback)]:
            job.outcome = Outcome(True, "the previous model is active")
        self._jobs = [j for j in self._jobs if not isinstance(j, ModelRollback)]

    def _fail_jobs(self, kind: type, why: str) -> None:
        for job in [j for j in self._jobs if isinstance(j, kind)]:
            job.outcome = Outcome(False, why)
        self._jobs = [j for j in self._jobs if not isinstance(j, kind)]

    def _answer_jobs(self) -> None:
        """Jobs whose outcome is set are answered by the fleet link; forget them here."""
        self._jobs = [j for j in self._jobs if j.outcome is None]


def _staged_from(model: InstalledModel) -> StagedModel:
    """A staged slot found at start, as the record staging would have returned (smoke-tested when staged)."""
    from agent.bundle.manifest import read_manifest
    from agent.bundle.smoke import SmokeReport

    manifest = read_manifest(model.model_path.parent)
    return StagedModel(model.name, model.version, model.kind, model.sha256, model.signer_key_id, None,
                       model.bundle_id, model.model_path.parent, model.model_path, manifest,
                       SmokeReport(model.kind, tuple(manifest.input_shape), 0.0, 0.0, 0.0, 0, "", 0.0))


def _set_aside(bundle: Path, where: str, why: str) -> None:
    """Move an inbox bundle out of the way (done/ or rejected/, with the reason beside it)."""
    target = bundle.parent / where
    with contextlib.suppress(OSError):
        target.mkdir(exist_ok=True)
        bundle.replace(target / bundle.name)
        if why:
            (target / f"{bundle.name}.reason.txt").write_text(why + "\n")
