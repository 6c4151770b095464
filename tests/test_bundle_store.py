"""The A/B model store: install, promote, rollback; and kill -9 at every checkpoint of each, then recover.

A crash must leave the store as it was before the step or as it is after it, never in between, and at
every instant (even before recovery) the active slot must name a complete bundle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.bundle.errors import StoreError
from agent.bundle.store import CHECKPOINTS, SLOTS, ModelStore
from tests.bundles import MODEL, MODEL_SHA256, make_bundle

CHILD = Path(__file__).with_name("bundle_store_child.py")
State = dict[str, str | None]


def version_of(directory: Path) -> str:
    """The bundle's version, after checking it is complete: every file there, the model's bytes intact."""
    assert sorted(path.name for path in directory.iterdir()) == ["manifest.json", "pilot.tflite"]
    assert hashlib.sha256((directory / "pilot.tflite").read_bytes()).hexdigest() == MODEL_SHA256
    return json.loads((directory / "manifest.json").read_text())["version"]


def state_of(root: Path) -> State:
    """Slot -> version, read through the links exactly as a loader would."""
    return {name: version_of(root / name) if (root / name).exists() else None for name in SLOTS}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    return {version: make_bundle(base / version, version=version) for version in ("A", "B", "C", "D")}


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    """A store with active B, previous A, staged C."""
    root = tmp_path_factory.mktemp("populated") / "models"
    store = ModelStore(root)
    for version in ("A", "B"):
        store.install(sources[version])
        store.promote()
    store.install(sources["C"])
    assert state_of(root) == {"active": "B", "previous": "A", "staged": "C"}
    return root


def copy_store(populated: Path, destination: Path) -> Path:
    shutil.copytree(populated, destination, symlinks=True)
    return destination


def assert_clean(root: Path) -> None:
    """Nothing left over: no journal, no temporary links, no work, no bundle that no slot names."""
    assert not (root / "journal.json").exists()
    assert not list(root.glob(".*.tmp"))
    assert not (root / "work").exists() or not list((root / "work").iterdir())
    referenced = {(root / name).readlink().name for name in SLOTS if (root / name).is_symlink()}
    assert {path.name for path in (root / "bundles").iterdir()} == referenced


def test_install_promote_rollback_discard(tmp_path: Path, sources: dict[str, Path]) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(StoreError, match="no staged model to promote"):
        store.promote()
    staged = store.install(sources["A"])
    assert staged.name == "staged" and version_of(staged.path) == "A"
    assert all(not (path.stat().st_mode & 0o222) for path in staged.path.iterdir())  # installed read-only
    store.promote()
    with pytest.raises(StoreError, match="no previous model to roll back to"):
        store.rollback()
    store.install(sources["B"])
    active_a = store.slot("active")
    assert active_a is not None
    store.promote()
    assert state_of(store.root) == {"active": "B", "previous": "A", "staged": None}
    assert version_of(active_a.path) == "A"  # a Slot's path is the bundle itself, not the moving link
    store.install(sources["C"])
    store.install(sources["D"])  # a newer staged model replaces the older one
    assert state_of(store.root) == {"active": "B", "previous": "A", "staged": "D"}
    store.rollback()
    assert state_of(store.root) == {"active": "A", "previous": None, "staged": "D"}  # B is gone for good
    store.discard_staged()
    assert state_of(store.root) == {"active": "A", "previous": None, "staged": None}
    assert_clean(store.root)
    assert store.recover() == []


def test_the_lock_keeps_out_a_second_changer(tmp_path: Path, sources: dict[str, Path]) -> None:
    root = tmp_path / "models"
    holder = ModelStore(root)
    with holder.lock():
        with pytest.raises(StoreError, match="another process is changing the model store"):
            ModelStore(root, lock_timeout_s=0.2).install(sources["A"])
        with pytest.raises(StoreError, match="needs the store's lock"):
            ModelStore(root).workspace()
    ModelStore(root, lock_timeout_s=0.2).install(sources["A"])


def test_one_store_shared_by_threads(tmp_path: Path, sources: dict[str, Path]) -> None:
    import threading

    store = ModelStore(tmp_path / "models", lock_timeout_s=0.2)
    refused: list[str] = []
    with store.lock():
        thread = threading.Thread(target=lambda: refused.append(_error(lambda: store.install(sources["A"]))))
        thread.start()
        thread.join()
        store.workspace()  # the holding thread may
    assert refused == [f"{store.root}: another thread is changing the model store (waited 0 s)"]
    store.install(sources["A"])
    assert state_of(store.root)["staged"] == "A"


def _error(action: object) -> str:
    try:
        action()  # type: ignore[operator]
    except StoreError as exc:
        return str(exc)
    return "no error"


def test_recover_refuses_a_damaged_journal_and_empties_a_dangling_slot(populated: Path, tmp_path: Path) -> None:
    root = copy_store(populated, tmp_path / "models")
    (root / "journal.json").write_text("{")
    with pytest.raises(StoreError, match=r"journal\.json: unreadable"):
        ModelStore(root).recover()
    (root / "journal.json").unlink()
    staged = (root / "staged").readlink()
    shutil.rmtree(root / staged)
    with pytest.raises(StoreError, match="not a bundle of this store"):
        ModelStore(root).slots()
    actions = ModelStore(root).recover()
    assert "emptied slot staged: it named a bundle that does not exist" in actions
    assert state_of(root) == {"active": "B", "previous": "A", "staged": None}


def run_child(root: Path, operation: str, *args: str, kill_at: int = -1) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHILD), str(root), operation, *args, "--kill-at", str(kill_at)],
                          capture_output=True, text=True, timeout=60)


SCENARIOS = {  # operation: (the state after it, from active B, previous A, staged C)
    "install": {"active": "B", "previous": "A", "staged": "D"},
    "promote": {"active": "C", "previous": "B", "staged": None},
    "rollback": {"active": "A", "previous": None, "staged": "C"},
    "discard": {"active": "B", "previous": "A", "staged": None},
}
BEFORE: State = {"active": "B", "previous": "A", "staged": "C"}


@pytest.mark.parametrize("operation", list(SCENARIOS))
def test_kill_9_at_every_checkpoint_leaves_old_or_new(operation: str, populated: Path, sources: dict[str, Path],
                                                      tmp_path: Path) -> None:
    args = [str(sources["D"])] if operation == "install" else []
    after = SCENARIOS[operation]
    # A clean run: its checkpoints are the points to kill at.
    clean = copy_store(populated, tmp_path / "clean")
    result = run_child(clean, operation, *args)
    assert result.returncode == 0, result.stderr
    trace = result.stdout.split()
    assert state_of(clean) == after
    assert_clean(clean)
    assert "commit.journal" in trace and set(trace) <= set(CHECKPOINTS)
    decided = trace.index("commit.journal")  # from here on the journal holds the decision: roll forward
    started = time.monotonic()
    for index, point in enumerate(trace):
        root = copy_store(populated, tmp_path / f"kill-{index}")
        result = run_child(root, operation, *args, kill_at=index)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr)
        assert result.stdout.split()[-1] == point
        # Before any recovery, the active slot already names a complete bundle, old or new.
        assert version_of(root / "active") in (BEFORE["active"], after["active"]), point
        actions = ModelStore(root).recover()
        expected = after if index >= decided else BEFORE
        assert state_of(root) == expected, (index, point, actions)
        assert_clean(root)
        assert ModelStore(root).recover() == []  # recovery is done in one go
    assert time.monotonic() - started < 30


def test_kill_9_during_recovery_too(populated: Path, tmp_path: Path) -> None:
    """A crash in the middle of a promote, then crashes in the middle of each recovery: still old-or-new."""
    root = copy_store(populated, tmp_path / "models")
    trace = run_child(copy_store(populated, tmp_path / "clean"), "promote").stdout.split()
    first_slot = trace.index("commit.slot")  # journal written, one slot moved
    assert run_child(root, "promote", kill_at=first_slot).returncode == -signal.SIGKILL
    recovery_trace = run_child(copy_store(root, tmp_path / "probe"), "recover").stdout.split()
    assert recovery_trace, "recovery of a half-done promote passes checkpoints"
    for index in range(len(recovery_trace)):
        attempt = copy_store(root, tmp_path / f"recover-{index}")
        assert run_child(attempt, "recover", kill_at=index).returncode == -signal.SIGKILL
        assert version_of(attempt / "active") in ("B", "C")
        ModelStore(attempt).recover()
        assert state_of(attempt) == SCENARIOS["promote"]
        assert_clean(attempt)


def test_the_active_model_after_recovery_loads_in_the_car_runtime(populated: Path, tmp_path: Path) -> None:
    from agent.pilot.model import Autopilot

    root = copy_store(populated, tmp_path / "models")
    trace = run_child(copy_store(populated, tmp_path / "clean"), "promote").stdout.split()
    assert run_child(root, "promote", kill_at=trace.index("commit.link_tmp")).returncode == -signal.SIGKILL
    ModelStore(root).recover()
    active = ModelStore(root).slot("active")
    assert active is not None
    pilot = Autopilot(active.path / MODEL.name)
    assert pilot.kind == "linear"
