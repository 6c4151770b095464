"""A/B model slots on disk that a power cut cannot leave half-written.

Layout under the store root (default ``<state directory>/models``)::

    bundles/<id>/          immutable bundle directories (the verified files, fsynced, then renamed here)
    active -> bundles/<id> the slots: symbolic links, each replaced by one rename(2)
    previous -> bundles/<id>
    staged -> bundles/<id>
    journal.json           the target of the change in progress (written before any slot moves)
    work/                  private scratch directories for installs (same file system, so rename works)
    .lock                  flock(2): one changer at a time (the daemon and the CLI)

Why links: renaming a directory over ``active`` would need ``active`` moved away first, and a power
cut between the two renames would leave no active model at all. A link is replaced by a single
atomic rename, and the directory it points to never changes once written, so ``active`` always names
a complete bundle, at every instant.

Every change is one *commit*: write the target slot map to ``journal.json`` (temp file, fsync, rename,
fsync the directory), move each slot (a new link, rename, fsync), remove the journal, then collect the
bundles no slot names. ``recover()`` at start finishes a commit whose journal exists (roll forward: the
decision was made) and removes what an interrupted install or collection left (roll back: an
unreferenced bundle was never visible). Crash-tested with SIGKILL at every checkpoint
(tests/test_bundle_store.py); power loss relies on the same fsync ordering, untested on hardware.

This module imports nothing but the standard library: the daemon can recover the store at start
before anything heavy loads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.bundle.errors import StoreError
from agent.durable import fsync_path

SLOTS = ("active", "previous", "staged")
# Where a test may stop the process (SIGKILL) to prove each step leaves old-or-new, never partial.
CHECKPOINTS = (
    "copy.file", "install.synced", "install.renamed", "commit.journal_tmp", "commit.journal", "commit.link_tmp",
    "commit.slot", "commit.applied", "commit.done", "gc.trashed", "gc.removing",
)
_BUNDLE_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Slot:
    name: str  # active, previous or staged
    bundle_id: str
    path: Path  # the bundle directory itself (bundles/<id>: never changes, even when the slot moves on)
    installed: float  # when the bundle directory was created (its mtime), seconds since the epoch


fsync_directory = fsync_path  # a directory's entries (renames, new links) made durable


def write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` so that after a crash it holds either its old bytes or ``data``, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    fsync_directory(path.parent)


class ModelStore:
    """The slots, and the only code that changes them. Methods take the store's lock themselves;
    ``lock()`` holds it across several calls (the staging pipeline holds it from unpacking to commit)."""

    def __init__(self, root: Path, *, lock_timeout_s: float = 60.0,
                 checkpoint: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.bundles = root / "bundles"
        self.work = root / "work"
        self.journal = root / "journal.json"
        self.lock_timeout_s = lock_timeout_s
        self._checkpoint = checkpoint or (lambda point: None)
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._thread_lock = threading.RLock()
        self._owner: int | None = None

    # -- reading -------------------------------------------------------------------------------
    def slot(self, name: str) -> Slot | None:
        """The bundle a slot names, or None if the slot is empty."""
        if name not in SLOTS:
            raise ValueError(f"unknown slot {name!r}; slots: {', '.join(SLOTS)}")
        link = self.root / name
        try:
            target = str(link.readlink())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{link}: not a slot link ({exc.strerror}); run recovery") from None
        bundle_id = _bundle_id_of(target)
        if bundle_id is None or not (self.bundles / bundle_id).is_dir():
            raise StoreError(f"{link}: points to {target!r}, which is not a bundle of this store")
        directory = self.bundles / bundle_id
        return Slot(name, bundle_id, directory, directory.stat().st_mtime)

    def slots(self) -> dict[str, Slot | None]:
        return {name: self.slot(name) for name in SLOTS}

    # -- changing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[ModelStore]:
        """Hold the store's lock (re-entrant within a thread); waits up to ``lock_timeout_s``.

        flock(2) keeps other processes out; a thread lock keeps this object's other threads out, so one
        ModelStore may be shared by the daemon's threads.
        """
        if not self._thread_lock.acquire(timeout=self.lock_timeout_s):
            raise StoreError(f"{self.root}: another thread is changing the model store "
                             f"(waited {self.lock_timeout_s:.0f} s)")
        try:
            with self._flock():
                yield self
        finally:
            self._thread_lock.release()

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        if self._lock_depth == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(descriptor)
                        raise StoreError(f"{self.root}: another process is changing the model store "
                                         f"(waited {self.lock_timeout_s:.0f} s)") from None
                    time.sleep(0.05)
            self._lock_fd = descriptor
            self._owner = threading.get_ident()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = None
                self._owner = None

    def workspace(self) -> Path:
        """A new empty directory on the store's file system, for a bundle about to be installed.

        Only while the lock is held: ``recover()`` (which also takes the lock) deletes leftovers.
        """
        if self._lock_depth == 0 or self._owner != threading.get_ident():
            raise StoreError("workspace() needs the store's lock: use `with store.lock():`")
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / _new_bundle_id()
        path.mkdir()
        return path

    def install(self, bundle: Path) -> Slot:
        """Copy a bundle directory (regular files only) into the store and make it the staged one."""
        with self.lock():
            workspace = self.workspace()
            copy_files(bundle, workspace, checkpoint=self._checkpoint)
            return self.install_prepared(workspace)

    def install_prepared(self, workspace: Path) -> Slot:
        """Make a filled ``workspace()`` the staged bundle: fsync it, rename it into bundles/, commit."""
        with self.lock():
            if workspace.parent != self.work or not workspace.is_dir():
                raise StoreError(f"{workspace}: not a workspace of this store")
            for path in workspace.iterdir():
                if not path.is_file() or path.is_symlink():
                    raise StoreError(f"{path}: a bundle holds only regular files")
                path.chmod(0o444)  # bundles never change once installed
                fsync_path(path)
            fsync_directory(workspace)
            self._checkpoint("install.synced")
            self.bundles.mkdir(exist_ok=True)
            target = self.bundles / workspace.name
            workspace.rename(target)
            self._checkpoint("install.renamed")
            fsync_directory(self.bundles)
            fsync_directory(self.work)
            current = self._current()
            current["staged"] = target.name
            self._commit(current)
            staged = self.slot("staged")
            assert staged is not None
            return staged

    def promote(self) -> Slot:
        """staged -> active, active -> previous (the old previous is discarded)."""
        with self.lock():
            current = self._current()
            if current["staged"] is None:
                raise StoreError("no staged model to promote")
            self._commit({"active": current["staged"], "previous": current["active"], "staged": None})
            active = self.slot("active")
            assert active is not None
            return active

    def rollback(self) -> Slot:
        """previous -> active; the model rolled back from is discarded (a second rollback cannot return to it)."""
        with self.lock():
            current = self._current()
            if current["previous"] is None:
                raise StoreError("no previous model to roll back to")
            self._commit({"active": current["previous"], "previous": None, "staged": current["staged"]})
            active = self.slot("active")
            assert active is not None
            return active

    def discard_staged(self) -> None:
        """Drop the staged model (a rejected shadow trial, a superseded update)."""
        with self.lock():
            current = self._current()
            if current["staged"] is not None:
                current["staged"] = None
                self._commit(current)

    def recover(self) -> list[str]:
        """Finish or undo whatever a crash interrupted; returns what it did (empty: nothing to do)."""
        actions: list[str] = []
        if not self.root.exists():
            return actions
        with self.lock():
            if self.journal.exists():
                try:
                    target = _read_journal(self.journal)
                except (ValueError, OSError) as exc:
                    # Written by rename, so never partial; unreadable means outside interference.
                    raise StoreError(f"{self.journal}: unreadable ({exc}); the slots are unchanged, "
                                     "inspect and remove it by hand") from None
                self._apply(target)
                self.journal.unlink()
                fsync_directory(self.root)
                actions.append("finished an interrupted change: " + ", ".join(
                    f"{name} = {target[name] or 'empty'}" for name in SLOTS))
            for leftover in sorted(self.root.glob(".*.tmp")):
                leftover.unlink()
                actions.append(f"removed {leftover.name}")
            if self.work.exists():
                for leftover in sorted(self.work.iterdir()):
                    _remove_tree(leftover)
                    actions.append(f"removed unfinished install work/{leftover.name}")
            for name in SLOTS:
                link = self.root / name
                if link.is_symlink() and _bundle_id_of(str(link.readlink())) not in self._bundle_ids():
                    link.unlink()
                    actions.append(f"emptied slot {name}: it named a bundle that does not exist")
            actions.extend(self._collect())
        return actions

    # -- internals -----------------------------------------------------------------------------
    def _bundle_ids(self) -> set[str]:
        if not self.bundles.exists():
            return set()
        return {path.name for path in self.bundles.iterdir() if _BUNDLE_ID.match(path.name)}

    def _current(self) -> dict[str, str | None]:
        if self.journal.exists():
            raise StoreError(f"{self.journal}: an interrupted change is pending; recover() first")
        current: dict[str, str | None] = {}
        for name in SLOTS:
            slot = self.slot(name)
            current[name] = slot.bundle_id if slot else None
        return current

    def _commit(self, target: dict[str, str | None]) -> None:
        for bundle_id in target.values():
            if bundle_id is not None and not (self.bundles / bundle_id).is_dir():
                raise StoreError(f"bundle {bundle_id} does not exist")
        temporary = self.root / ".journal.json.tmp"
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(target, handle)
            handle.flush()
            os.fsync(handle.fileno())
        self._checkpoint("commit.journal_tmp")
        temporary.replace(self.journal)
        fsync_directory(self.root)
        self._checkpoint("commit.journal")
        self._apply(target)
        self._checkpoint("commit.applied")
        self.journal.unlink()
        fsync_directory(self.root)
        self._checkpoint("commit.done")
        self._collect()

    def _apply(self, target: dict[str, str | None]) -> None:
        """Point each slot at its target (idempotent, so recovery can run it again)."""
        # previous first: until active moves, the model it replaces is already kept as previous.
        for name in ("previous", "active", "staged"):
            link = self.root / name
            bundle_id = target.get(name)
            try:
                existing: str | None = str(link.readlink())
            except FileNotFoundError:
                existing = None
            wanted = f"bundles/{bundle_id}" if bundle_id else None
            if existing == wanted:
                continue
            if wanted is None:
                link.unlink()
            else:
                temporary = self.root / f".{name}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    temporary.unlink()
                temporary.symlink_to(wanted)
                self._checkpoint("commit.link_tmp")
                temporary.replace(link)
            fsync_directory(self.root)
            self._checkpoint("commit.slot")

    def _collect(self) -> list[str]:
        """Delete bundles no slot names: renamed to .trash-* first, so a half-deleted one is never a bundle."""
        actions: list[str] = []
        if not self.bundles.exists():
            return actions
        referenced = {slot.bundle_id for slot in self.slots().values() if slot is not None}
        for path in sorted(self.bundles.iterdir()):
            if path.name.startswith(".trash-"):
                _remove_tree(path)
                actions.append(f"removed {path.name}")
            elif _BUNDLE_ID.match(path.name) and path.name not in referenced:
                trash = self.bundles / f".trash-{path.name}"
                path.rename(trash)
                fsync_directory(self.bundles)
                self._checkpoint("gc.trashed")
                _remove_tree(trash, checkpoint=self._checkpoint)
                actions.append(f"removed unreferenced bundle {path.name}")
        return actions


def copy_files(source: Path, destination: Path, *, checkpoint: Callable[[str], None] | None = None,
               max_files: int = 64) -> None:
    """Copy a flat directory's regular files (no links, no subdirectories), each written then fsynced."""
    entries = sorted(source.iterdir())
    if len(entries) > max_files:
        raise StoreError(f"{source}: {len(entries)} entries; a bundle has at most {max_files} files")
    for path in entries:
        if path.is_symlink() or not path.is_file():
            raise StoreError(f"{path}: a bundle holds only regular files (no links or directories)")
        with path.open("rb") as reader, (destination / path.name).open("xb") as writer:
            shutil.copyfileobj(reader, writer, _CHUNK)
            writer.flush()
            if checkpoint:
                checkpoint("copy.file")
            os.fsync(writer.fileno())


def _remove_tree(path: Path, checkpoint: Callable[[str], None] | None = None) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    path.chmod(0o755)
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.is_symlink():
            _remove_tree(child)
        else:
            child.unlink()
        if checkpoint:
            checkpoint("gc.removing")
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def _bundle_id_of(target: str) -> str | None:
    match = re.fullmatch(r"bundles/(.+)", target)
    return match.group(1) if match and _BUNDLE_ID.match(match.group(1)) else None


def _new_bundle_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def _read_journal(path: Path) -> dict[str, str | None]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or set(data) != set(SLOTS):
        raise ValueError("not a slot map")
    for value in data.values():
        if value is not None and not (isinstance(value, str) and _BUNDLE_ID.match(value)):
            raise ValueError(f"not a bundle id: {value!r}")
    return data
