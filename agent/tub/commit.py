"""One record onto disk, all or nothing: staged files, renames as the commit, and an undo journal.

Every write is all-or-nothing, in an order that leaves a readable tub however the process dies:

1. images (written directly: a file not yet named by a catalog line is harmless);
2. the catalog line: appended (``O_APPEND``), or, for a catalog's first line, into a temporary
   file (``.<name>.tmp``) that replaces the placeholder or creates the next catalog;
3. the catalog manifest and the manifest, each into a temporary file;
4. the commit: renames (catalog, catalog manifest, manifest), which need no free space.

When any step raises (``ENOSPC`` or any other ``OSError``) the record is undone before the
original exception propagates: its images are removed, the catalog is truncated to its previous
length (or back to the placeholder), temporary files are removed, and files already renamed
are put back, so the catalog's lines, its manifest's ``line_lengths`` and the manifest's
``current_index`` agree and DonkeyCar reads exactly the records ``write`` returned for. Undoing
needs no free space (truncate, unlink, rename, overwrite one byte in place), except restoring the
previous catalog manifest when the commit fails after replacing it (the manifest's rename or the
directory's fsync failed: I/O errors, not a full disk). If that restore fails too, the catalog
manifest counts one line more than the catalog (DonkeyCar still reads the right records: it
iterates lines) until the next ``write`` or ``close`` rewrites both manifests from memory.

The file primitives work on raw file descriptors, so a failed write leaves no buffered data
behind. Their names are the seams the fault-injection tests patch (``tests/test_tub_full_disk.py``):
every step of a write calls them through this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from agent.durable import fsync_path as _fsync_path  # the name the tub code (and its tests) use
from agent.tub.layout import IMAGES_DIR, MANIFEST, Catalog
from agent.tub.records import EncodedImage
from agent.tub.recovery import cut_catalog


# -- file primitives ---------------------------------------------------------------------------------
def _write_all(fd: int, data: bytes) -> None:
    """Write every byte; ``os.write`` may write part of the data before the disk fills."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_file(path: Path, data: bytes, *, sync: bool = False) -> None:
    """Create or replace ``path`` with ``data``; on failure remove it (no half-written file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _rename(source: Path, target: Path) -> None:
    """The commit step: a rename within a directory replaces ``target`` atomically, needing no space."""
    source.replace(target)


def _atomic_write(path: Path, data: bytes, *, sync: bool) -> None:
    """Replace ``path`` with ``data`` or leave it as it was; never leaves the temporary file behind."""
    tmp = _tmp_path(path)
    _write_file(tmp, data, sync=sync)
    try:
        _rename(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# -- one record --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Everything one record changes, applied to the writer only once it is on disk."""

    index: int
    line: bytes
    catalog: Catalog
    catalog_paths: list[str]
    manifest_metadata: dict[str, Any]
    new_file: bool  # the catalog file is (re)created with this line
    replaces_listed: bool  # ... and it replaces a catalog the manifest lists (the placeholder)
    sync: bool
    previous: Catalog | None  # the catalog records went to before this one: restored on undo
    manifest: bytes  # manifest.json with this record counted


class Undo:
    """Undo actions of one write, run newest first; each one runs even if another fails."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], object]] = []

    def push(self, action: Callable[[], object]) -> None:
        self._actions.append(action)

    def run(self) -> bool:
        """Undo everything; False if some action failed (the caller must re-synchronise)."""
        ok = True
        for action in reversed(self._actions):
            try:
                action()
            except OSError:
                ok = False
        self._actions.clear()
        return ok


def commit_record(tub: Path, plan: Plan, images: list[EncodedImage], catalog_fd: int | None, undo: Undo) -> int | None:
    """Stage every byte, then rename; each step first registers how to undo it.

    ``catalog_fd`` is the last catalog, opened for appending (required unless the record starts a
    catalog file). Returns the descriptor of a newly created catalog file (None when the line was
    appended).
    """
    for name, data in images:
        image_path = tub / IMAGES_DIR / name
        undo.push(partial(_unlink, image_path))
        _write_file(image_path, data)
    new_fd = _stage_new_catalog(tub, plan, undo) if plan.new_file else None
    if new_fd is None:
        assert catalog_fd is not None
        _append_line(catalog_fd, plan, undo)
    elif catalog_fd is not None:
        os.fsync(catalog_fd)  # the full catalog being left behind is never written again
    catalog_manifest = tub / plan.catalog.manifest_name
    catalog_manifest_tmp = _stage(catalog_manifest, plan.catalog.manifest_bytes(), plan, undo)
    manifest_tmp = _stage(tub / MANIFEST, plan.manifest, plan, undo)
    # Commit: only renames from here on, and none of them needs free space.
    if new_fd is not None:
        catalog = tub / plan.catalog.name
        _rename(_tmp_path(catalog), catalog)
        undo.push(_undo_catalog_rename(tub, plan))
    _rename(catalog_manifest_tmp, catalog_manifest)
    undo.push(_undo_catalog_manifest_rename(tub, plan))
    if plan.sync:
        _fsync_path(tub)  # the renames so far; the manifest's is made durable by the next sync
    _rename(manifest_tmp, tub / MANIFEST)
    return new_fd


def _stage_new_catalog(tub: Path, plan: Plan, undo: Undo) -> int:
    """A catalog's first line goes into a temporary file, renamed over the placeholder at commit."""
    tmp = _tmp_path(tub / plan.catalog.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
    undo.push(partial(os.close, fd))
    undo.push(partial(_unlink, tmp))
    _write_all(fd, plan.line)
    if plan.sync:
        os.fsync(fd)
    return fd


def _append_line(fd: int, plan: Plan, undo: Undo) -> None:
    previous = plan.catalog.size - len(plan.line)
    undo.push(partial(os.ftruncate, fd, previous))
    _write_all(fd, plan.line)
    if plan.sync:
        os.fsync(fd)


def _stage(path: Path, data: bytes, plan: Plan, undo: Undo) -> Path:
    tmp = _tmp_path(path)
    undo.push(partial(_unlink, tmp))
    _write_file(tmp, data, sync=plan.sync)
    return tmp


def _undo_catalog_rename(tub: Path, plan: Plan) -> Callable[[], None]:
    path = tub / plan.catalog.name
    if plan.replaces_listed:
        return partial(cut_catalog, path, 0)  # back to the placeholder the manifest lists
    return partial(_unlink, path)  # a new catalog, listed nowhere yet


def _undo_catalog_manifest_rename(tub: Path, plan: Plan) -> Callable[[], None]:
    path = tub / plan.catalog.manifest_name
    if plan.new_file and not plan.replaces_listed:
        return partial(_unlink, path)  # a new catalog's manifest, listed nowhere yet
    previous = plan.previous
    assert previous is not None
    # The only undo step that needs space: reached when the manifest's rename failed.
    return partial(_atomic_write, path, previous.manifest_bytes(), sync=False)
