"""A model rollout on a driving car, in process: the drive core on the twin rig, the real store, real staging
(in its child process: signature, smoke test), a real shadow trial, activation only once the car is stopped,
probation and an automatic rollback.

The misbehaviour for the rollback is injected at the model's boundary: the candidate is the real interpreter on the
real model, wrapped so the test can make it answer NaN on demand (a model that fails only on some live frames,
which its smoke test and shadow trial could not see). The core's NaN handling itself is tested with a real NaN
model on real frames in tests/test_drive_core.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle.signing import sign_with_key
from agent.bundle.stage import installed
from agent.bundle.store import ModelStore
from agent.config import DriveConfig, RealtimeConfig, validate
from agent.core.commands import CommandLane, SetMode
from agent.core.drive import DriveCore, DriveParts
from agent.pilot import Autopilot
from agent.pilot.model import PilotOutput
from agent.rollout.manager import Rollout, settings_from
from agent.rollout.staging import stage_in_child
from tests.bundles import MODEL, make_bundle, make_key
from tests.fakes.parts import TwinRig

FIXTURES = Path(__file__).parent / "fixtures" / "models"


class Glitchy:
    """The real interpreter; ``glitch`` makes its answers NaN (the test's injected misbehaviour)."""

    glitch = False

    def __init__(self, path: Path, kind: str, threads: int = 2) -> None:
        self.inner = Autopilot(path, kind=kind, num_threads=threads)
        self.path, self.kind, self.image_shape = self.inner.path, self.inner.kind, self.inner.image_shape

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def result(self) -> Any:
        if not Glitchy.glitch:
            return self.inner.result()
        real = self.inner._decode  # the interpreter's outputs decode to NaN: Autopilot.result refuses them
        self.inner._decode = lambda: PilotOutput(float("nan"), 0.2)  # type: ignore[method-assign]
        try:
            return self.inner.result()
        finally:
            self.inner._decode = real  # type: ignore[method-assign]


def setup(tmp_path: Path, *, shadow: bool, probation_s: float = 30.0) -> tuple[Any, ModelStore, Path]:
    private, public = make_key(tmp_path, "fleet")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "fleet.pem").write_bytes(public.read_bytes())
    config = validate({"models": {"trust_dir": str(trust), "store": str(tmp_path / "store"),
                                  "rollout": {"shadow": shadow, "shadow_min_frames": 20, "probation_s": probation_s}},
                       "drive": {"realtime": {"priority": 0, "lock_memory": False}}}, "test")
    return config, ModelStore(tmp_path / "store"), private


def bundle(tmp_path: Path, private: Path, version: str, model: Path = MODEL) -> Path:
    directory = make_bundle(tmp_path / f"bundle-{version}", model_file=model, version=version)
    sign_with_key(directory, private)
    return directory


def make_rollout(config: Any, store: ModelStore, core: DriveCore) -> Rollout:
    def stage(source: str, **kwargs: Any) -> Any:
        return stage_in_child(config, source, **kwargs)

    def load(path: Path, kind: str, threads: int = 2) -> Any:
        pilot = Glitchy(path, kind, threads)
        pilot.run(np.full((120, 160, 3), 128, np.uint8))
        return pilot

    return Rollout(store, core, core.lanes.add(CommandLane("models", capacity=4)), settings_from(config),
                   stage=stage, load_pilot=load)


def steps(rollout: Rollout) -> list[tuple[str, dict]]:
    return [(e.detail["step"], e.detail) for e in rollout.events.drain() if e.kind == "model"]


async def forward_events(core: DriveCore, rollout: Rollout, stop: asyncio.Event) -> None:
    """What the daemon does with the core's events: the rollout's probation sees them."""
    while not stop.is_set():
        for event in core.events.drain():
            rollout.observe(event)
        await asyncio.sleep(0.05)


async def until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


@contextlib.contextmanager
def driving(make_pilot: Any = lambda: Autopilot(MODEL), label: dict | None = None, **drive: Any) -> Iterator[DriveCore]:
    """The drive core on the twin rig, ready; stopped and closed afterwards."""
    rig = TwinRig()
    core = DriveCore(DriveConfig(realtime=RealtimeConfig(priority=0, lock_memory=False), **drive),
                     DriveParts(rig, rig, make_pilot, model_label=label))
    core.start()
    try:
        assert core.wait_ready(20), core.error
        yield core
    finally:
        core.stop()
        rig.close()


def run(rollout: Rollout, body: Any, *beside: Any) -> list[tuple[str, dict]]:
    """Start the rollout as the daemon does (start in a worker thread, then run), play ``body`` with the
    ``beside`` coroutines (given the stop event) running too, stop; the model events it emitted."""
    seen: list[tuple[str, dict]] = []

    async def main() -> None:
        stop = asyncio.Event()
        await asyncio.to_thread(rollout.start)
        tasks = [asyncio.create_task(rollout.run(stop)), *(asyncio.create_task(job(stop)) for job in beside)]
        try:
            await body()
        finally:
            seen.extend(steps(rollout))
            stop.set()
            await asyncio.wait(tasks, timeout=10)

    asyncio.run(main())
    return seen


async def stage(rollout: Rollout, tmp_path: Path, private: Path, version: str, model: Path = MODEL) -> None:
    """A signed bundle staged (in the staging child) and handed to the rollout, as after an inbox drop."""
    await asyncio.to_thread(rollout.stage, str(bundle(tmp_path, private, version, model)))
    rollout._staged(rollout._stage_from_slot(), None)


@pytest.mark.slow
def test_shadow_then_activation_only_when_stopped_then_an_automatic_rollback(tmp_path: Path) -> None:
    config, store, private = setup(tmp_path, shadow=True)
    store.install(bundle(tmp_path, private, "1.0.0"))  # the car's first model, as Ansible would leave it
    store.promote()
    first = installed(store.slot("active"))  # type: ignore[arg-type]
    with driving(lambda: Autopilot(first.model_path), {"name": "pilot", "version": "1.0.0"},
                 stopped_after_ms=300) as core:
        rollout = make_rollout(config, store, core)

        async def scenario() -> None:
            try:
                await stage(rollout, tmp_path, private, "2.0.0")
                assert await until(lambda: rollout.phase == "shadow", 20)
                assert await until(lambda: rollout.phase == "waiting_for_stop", 20), rollout.status()
                await asyncio.sleep(1.5)  # the car drives on local: the swap is refused, and waits
                assert rollout.phase == "waiting_for_stop" and core.status()["model"]["version"] == "1.0.0"
                assert core.submit(SetMode(mode="user")) == ""  # the operator stops the car
                assert await until(lambda: rollout.phase == "probation", 10), rollout.status()
                assert core.status()["model"]["version"] == "2.0.0"
                assert installed(store.slot("active")).version == "2.0.0"  # type: ignore[arg-type]
                assert core.submit(SetMode(mode="local")) == ""
                await asyncio.sleep(0.5)
                Glitchy.glitch = True  # the new model starts answering NaN on live frames
                assert await until(lambda: rollout.phase == "idle" and core.status()["model"]["version"] == "1.0.0",
                                   15), rollout.status()
                assert installed(store.slot("active")).version == "1.0.0"  # type: ignore[arg-type]
            finally:
                Glitchy.glitch = False

        seen = run(rollout, scenario, lambda stop: forward_events(core, rollout, stop))
    names = [name for name, _ in seen]
    assert names[:1] == ["staged"] and "shadow_started" in names and "shadow_passed" in names
    assert names.index("activation_waiting") < names.index("activated") < names.index("rollback_started")
    assert names[-1] == "rolled_back" and core.metrics.deadline_misses == 0
    waiting = dict(seen)["activation_waiting"]
    assert "moving" in waiting["detail"] and waiting["model_version"] == "2.0.0"
    assert "inference errors" in dict(seen)["rollback_started"]["detail"]


@pytest.mark.slow
def test_a_candidate_that_disagrees_in_shadow_is_rejected_and_never_drives(tmp_path: Path) -> None:
    config, store, private = setup(tmp_path, shadow=True)
    store.install(bundle(tmp_path, private, "1.0.0"))
    store.promote()
    with driving() as core:
        rollout = make_rollout(config, store, core)

        async def scenario() -> None:
            await stage(rollout, tmp_path, private, "3.0.0", FIXTURES / "linear.tflite")
            assert await until(lambda: rollout.phase == "idle" and rollout.pending is None, 30), rollout.status()

        seen = run(rollout, scenario)
    rejected = dict(seen)["rejected"]
    assert "shadow trial failed" in rejected["detail"] and rejected["model_version"] == "3.0.0"
    assert store.slot("staged") is None and installed(store.slot("active")).version == "1.0.0"  # type: ignore[arg-type]
    assert core.status()["model"].get("path") == str(MODEL)


@pytest.mark.slow
def test_with_attestation_the_new_model_is_not_opened_before_the_fleet_lists_it(tmp_path: Path) -> None:
    """Policy first, then the measurement: the candidate's file is opened (loaded) only after the policy sync
    confirms; a sync that never confirms rejects the update and leaves the active model driving."""
    from agent.attest.policy_sync import PolicyReady, PolicySync

    config, store, private = setup(tmp_path, shadow=False)
    store.install(bundle(tmp_path, private, "1.0.0"))
    store.promote()
    published: list[tuple[str, bytes]] = []
    sync = PolicySync(fleet="lab", car="car1", uuid="0" * 8 + "-0000-0000-0000-" + "0" * 12,
                      publish=lambda topic, payload: published.append((topic, payload)), retry_s=0.2)
    opened: list[float] = []
    confirmed: list[float] = []
    answer = {"confirm": True}

    async def policy_ready(staged: Any) -> bool:
        request = sync.request({str(staged.model_path): [staged.sha256]})
        return await sync.wait_ready(request, 2.0)

    async def fleet(stop: asyncio.Event) -> None:  # the bridge's side: confirm each request, or stay silent
        while not stop.is_set():
            await asyncio.sleep(0.3)
            for topic, payload in list(published):
                request = json.loads(payload)
                if answer["confirm"] and topic.endswith("/attestation/policy"):
                    confirmed.append(time.monotonic())
                    sync.on_ready(PolicyReady(request["request_id"], "car1", request["uuid"], True, "car1", 2,
                                              {p: tuple(d) for p, d in request["digests"].items()}, "").encode())
                published.remove((topic, payload))

    with driving() as core:
        rollout = make_rollout(config, store, core)
        load = rollout.load_pilot
        rollout.load_pilot = lambda path, kind, *threads: (opened.append(time.monotonic()),
                                                           load(path, kind, *threads))[1]
        rollout.policy_ready = policy_ready

        async def scenario() -> None:
            await stage(rollout, tmp_path, private, "2.0.0")
            assert await until(lambda: rollout.phase == "waiting_for_stop", 10), rollout.status()
            assert confirmed and opened and opened[0] > confirmed[0]  # opened only after the confirmation
            rollout._discard("test: next case")
            answer["confirm"] = False  # the fleet never lists the next one
            opened.clear()
            await stage(rollout, tmp_path, private, "3.0.0")
            assert rollout.pending is not None
            assert await until(lambda: rollout.phase == "waiting_for_policy", 5), rollout.status()
            assert await until(lambda: rollout.pending is None, 10), rollout.status()  # given up after 2 s
            assert opened == []  # never opened

        seen = run(rollout, scenario, fleet)
    rejected = [d for name, d in seen if name == "rejected" and d.get("model_version") == "3.0.0"]
    assert rejected and "did not confirm the runtime policy" in rejected[0]["detail"]


@pytest.mark.slow
def test_a_model_staged_before_the_start_is_resumed(tmp_path: Path) -> None:
    """`donkey-agent model install` while the agent was stopped: the next start picks the staged model up (its
    start runs in a worker thread, as the daemon runs it) and offers it once the car stops."""
    config, store, private = setup(tmp_path, shadow=False)
    store.install(bundle(tmp_path, private, "1.0.0"))
    store.promote()
    store.install(bundle(tmp_path, private, "2.0.0"))
    with driving(mode="user") as core:
        rollout = make_rollout(config, store, core)

        async def scenario() -> None:
            assert await until(lambda: rollout.phase == "probation", 15), rollout.status()

        seen = run(rollout, scenario)
    names = [name for name, _ in seen]
    assert names[:2] == ["resumed", "activated"] and core.status()["model"]["version"] == "2.0.0"


@pytest.mark.slow
def test_a_bundle_dropped_in_the_inbox_is_staged_and_set_aside(tmp_path: Path) -> None:
    """The technician's (or Ansible's) way in: a tar written as NAME.part and renamed; a bad one is rejected and
    moved to rejected/ with the reason beside it, a good one staged and moved to done/."""
    import tarfile

    config, store, private = setup(tmp_path, shadow=False)
    store.install(bundle(tmp_path, private, "1.0.0"))
    store.promote()
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def drop(name: str, directory: Path) -> None:
        part = inbox / f"{name}.part"
        with tarfile.open(part, "w") as tar:
            for path in sorted(directory.iterdir()):
                tar.add(path, arcname=path.name)
        part.rename(inbox / name)

    unsigned = make_bundle(tmp_path / "unsigned", version="9.9.9")
    with driving() as core:
        rollout = make_rollout(config, store, core)
        rollout.inbox = inbox

        async def scenario() -> None:
            drop("unsigned.tar", unsigned)
            assert await until((inbox / "rejected" / "unsigned.tar").exists, 20), rollout.status()
            drop("good.tar", bundle(tmp_path, private, "2.0.0"))
            assert await until(lambda: rollout.phase == "waiting_for_stop", 20), rollout.status()

        seen = run(rollout, scenario)
    assert (inbox / "done" / "good.tar").exists() and not list(inbox.glob("*.tar"))
    assert "signature" in (inbox / "rejected" / "unsigned.tar.reason.txt").read_text()
    names = [name for name, _ in seen]
    assert names[:4] == ["inbox", "refused", "inbox", "staged"], names
    assert dict(seen)["staged"]["model_version"] == "2.0.0"


def test_a_model_for_another_camera_is_rejected_before_it_is_loaded(tmp_path: Path) -> None:
    config, store, private = setup(tmp_path, shadow=False)
    rollout = make_rollout(config, store, DriveCore(DriveConfig(), DriveParts(None, None)))  # type: ignore[arg-type]
    rollout.frame_shape = (240, 320)  # this car's camera; the bundle's model takes 120x160
    loaded: list[Path] = []
    rollout.load_pilot = lambda path, kind, *threads: loaded.append(path)

    async def scenario() -> None:
        await stage(rollout, tmp_path, private, "2.0.0")
        assert await until(lambda: rollout.pending is None, 10), rollout.status()

    rejected = dict(run(rollout, scenario))["rejected"]
    assert "takes 120x160 frames; this car's camera gives 240x320" in rejected["detail"] and loaded == []
    assert store.slot("staged") is None


def test_an_active_model_changed_on_disk_is_never_run(tmp_path: Path) -> None:
    """The store's model file is checked against the digest it was verified with at every start."""
    import subprocess
    import sys

    from tests.test_cli import start_twin

    _, store, private = setup(tmp_path, shadow=False)
    store.install(bundle(tmp_path, private, "1.0.0"))
    active = store.promote()
    model = active.path / "pilot.tflite"
    model.chmod(0o644)
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in a weight
    model.write_bytes(bytes(data))
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(f'[models]\nstore = "{tmp_path / "store"}"\ntrust_dir = "{tmp_path / "trust"}"\n'
                          '[drive.realtime]\npriority = 0\n')
    twin, port = start_twin("--track", "generated_track")
    try:
        run = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(agent_toml), "--sim",
                              f"127.0.0.1:{port}", "--duration", "3"], capture_output=True, text=True, timeout=60,
                             check=False)
    finally:
        twin.terminate()
        twin.wait(10)
    assert run.returncode != 0
    assert "is not the" in run.stderr and "it was verified with" in run.stderr and "needs an autopilot" in run.stderr
