"""A crash-safe, all-or-nothing writer for DonkeyCar Tub v2 (``donkeycar/parts/tub_v2.py``, ``datastore_v2.py``).

The format, and what DonkeyCar's reader needs from it (hence the *empty-tub placeholder* a new
tub starts with), are described in ``agent.tub.layout``; the order of a write's steps and how a
failed one is undone, in ``agent.tub.commit``; how a tub found on disk is cut back to what its
manifests count, in ``agent.tub.recovery``.

State left on disk by each failure:

========================================  ===========================================================
Event                                     On disk afterwards
========================================  ===========================================================
new tub, space for the placeholder        readable: 0 records (DonkeyCar read-only, ``tub info``)
new tub, no space (ENOSPC/EDQUOT)         the directories it could make, no file at all (no tmp file);
                                          unreadable ("no manifest.json"): nothing can be recorded
                                          without a free byte. ``pending_error`` holds the error,
                                          and each ``write`` tries the placeholder again first
new tub, any other OSError                raised from the constructor (a configuration error)
``write`` raises OSError, at any step     exactly as before the call; the writer continues
killed before the catalog line            an orphan image, overwritten by the next record
killed before the renames                 a hidden ``.<name>.tmp``, removed when a writer reopens
killed after the line, before manifests   one line more than counted: DonkeyCar iterates it while
                                          ``len`` says one less; the next writer cuts it
killed between the two manifests          ``current_index`` one behind (DonkeyCar's ``len`` too):
                                          the next writer adopts the catalog manifest's count
killed while starting catalog ``n+1``     catalog ``n+1`` not listed yet: ignored, then replaced
power loss                                up to ``fsync_interval`` of records lost; the next writer
                                          cuts the catalog to what its manifest counts
``close`` with no record in the tub       the placeholder and the (empty) directories this writer
                                          created are removed: nothing recorded, nothing left
========================================  ===========================================================
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from agent.tub.commit import Plan, Undo, _atomic_write, _fsync_path, _unlink, commit_record
from agent.tub.layout import (
    FIRST_CATALOG,
    IMAGES_DIR,
    MANIFEST,
    PLACEHOLDER,
    STANDARD_INPUTS,
    STANDARD_TYPES,
    SUPPORTED_TYPES,
    Catalog,
    TubFormatError,
    catalog_manifest_name,
    image_file_name,
    manifest_bytes,
    session_date,
    with_session,
)
from agent.tub.records import EncodedImage, catalog_line, convert_record
from agent.tub.recovery import cut_catalog, refuse_orphan_catalogs, remove_stale_tmp_files, reopen_catalog

__all__ = [  # the names this module has always offered, wherever they are defined now
    "FIRST_CATALOG",
    "IMAGES_DIR",
    "MANIFEST",
    "PLACEHOLDER",
    "SPACE_ERRNOS",
    "STANDARD_INPUTS",
    "STANDARD_TYPES",
    "SUPPORTED_TYPES",
    "EncodedImage",
    "TubFormatError",
    "TubWriter",
    "image_file_name",
    "is_space_error",
]

SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # errors that pass when space returns


def is_space_error(exc: BaseException) -> bool:
    """True for "disk full" and "quota exceeded": failures that end when space is freed."""
    return isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS


class TubWriter:
    """Appends records to a Tub v2 directory, creating it or continuing an existing one.

    Not thread-safe: use one writer per thread, or ``TubRecorder`` to write off the caller's
    thread. ``fsync_interval`` bounds how much a power cut can lose (a killed process
    loses nothing that ``write`` returned for); ``0`` syncs every record.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        inputs: Sequence[str] = STANDARD_INPUTS,
        types: Sequence[str] = STANDARD_TYPES,
        metadata: Mapping[str, str] | None = None,
        *,
        max_catalog_len: int = 1000,
        fsync_interval: float = 1.0,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        if len(inputs) != len(types):
            raise TubFormatError(f"{len(inputs)} inputs but {len(types)} types")
        unknown = set(types) - SUPPORTED_TYPES
        if unknown:
            raise TubFormatError(f"unsupported tub types {sorted(unknown)}; supported: {sorted(SUPPORTED_TYPES)}")
        self.inputs = list(inputs)
        self.types = list(types)
        self._input_types = dict(zip(self.inputs, self.types, strict=True))
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.max_len = max_catalog_len
        self.fsync_interval = fsync_interval
        self._last_sync = 0.0
        self.catalog_paths: list[str] = []
        self.current_index = 0
        self.deleted_indexes: list[int] = []
        self.manifest_metadata: dict[str, Any] = {"created_at": time.time()}
        self._catalog: Catalog | None = None  # the last catalog, the one records go to
        self._fd: int | None = None  # the last catalog, opened for appending on first use
        self._on_disk = False  # manifest.json exists (ours or found)
        self._resync_needed = False  # disk and memory disagree after a failed undo or a crash
        self._created_dirs: list[Path] = []
        self._session_started = False
        self._closed = False
        # Why the tub is not on disk yet (no space when it opened); each write retries first.
        self.pending_error: OSError | None = None

        if (self.path / MANIFEST).exists():
            self._load_existing()
            remove_stale_tmp_files(self.path)
        sessions = self.manifest_metadata.get("sessions") or {}
        self.session_number = sessions["last_id"] + 1 if sessions else 0
        self.session_id = f"{session_date()}_{self.session_number}"
        try:
            self._prepare_disk()
        except OSError as exc:
            if not is_space_error(exc):
                raise
            self.pending_error = exc

    # -- opening ---------------------------------------------------------------------------
    def _prepare_disk(self) -> None:
        """Directories, then the empty-tub placeholder (new tubs) or a re-sync (repaired tubs)."""
        self._make_dirs()
        if not self._on_disk:
            refuse_orphan_catalogs(self.path)
            self._write_placeholder()
        elif self._resync_needed:
            self._resync()
        self.pending_error = None

    def _make_dirs(self) -> None:
        for directory in (self.path, self.path / IMAGES_DIR):
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                self._created_dirs.append(directory)

    def _write_placeholder(self) -> None:
        """Leave the least DonkeyCar reads as an empty tub; all three files or none of them."""
        catalog = Catalog(FIRST_CATALOG, self.current_index, time.time())
        undo = Undo()
        try:
            undo.push(partial(_unlink, self.path / catalog.name))
            _atomic_write(self.path / catalog.name, PLACEHOLDER, sync=True)
            undo.push(partial(_unlink, self.path / catalog.manifest_name))
            _atomic_write(self.path / catalog.manifest_name, catalog.manifest_bytes(), sync=True)
            manifest = self._manifest_bytes([catalog.name], self.current_index, self.manifest_metadata)
            _atomic_write(self.path / MANIFEST, manifest, sync=True)
        except BaseException:
            undo.run()
            raise
        self._catalog = catalog
        self.catalog_paths = [catalog.name]
        self._on_disk = True

    def _load_existing(self) -> None:
        manifest_path = self.path / MANIFEST
        try:
            lines = manifest_path.read_text(encoding="utf-8").splitlines()
            inputs, types, metadata, manifest_metadata, catalogs = (json.loads(line) for line in lines[:5])
        except (ValueError, OSError) as exc:
            raise TubFormatError(f"{manifest_path}: not a readable Tub v2 manifest ({exc})") from exc
        if (inputs, types) != (self.inputs, self.types):
            raise TubFormatError(
                f"{manifest_path}: the tub records inputs {inputs} of types {types}; "
                f"cannot append records with inputs {self.inputs} of types {self.types}"
            )
        self.metadata = {**metadata, **self.metadata}
        self.manifest_metadata = manifest_metadata
        self.catalog_paths = list(catalogs["paths"])
        self.current_index = int(catalogs["current_index"])
        self.max_len = int(catalogs["max_len"])
        self.deleted_indexes = list(catalogs["deleted_indexes"])
        self._on_disk = True
        if self.catalog_paths:
            self._reopen_last_catalog()

    def _reopen_last_catalog(self) -> None:
        """Continue the last catalog, first cutting what a crash left beyond its manifest."""
        catalog, shortened = reopen_catalog(self.path / self.catalog_paths[-1])
        if shortened:
            self._resync_needed = True
        recorded = catalog.start_index + len(catalog.line_lengths)
        if recorded != self.current_index:
            self.current_index = recorded
            self._resync_needed = True
        self._catalog = catalog

    # -- writing ---------------------------------------------------------------------------
    def write(self, record: Mapping[str, Any]) -> int:
        """Write one record (keys are the tub's inputs; None values are skipped). Returns its index.

        All or nothing: raises TubFormatError, before anything is written, for a value that
        cannot be stored (a non-finite float, a wrong shape); raises the OSError of a failed
        step (``ENOSPC``...) after undoing the record, leaving the tub as it was.
        """
        if self._closed:
            raise TubFormatError(f"{self.path}: tub writer is closed")
        index = self.current_index
        contents, images = convert_record(record, self._input_types, index)
        line = catalog_line(contents, index, self.session_id)

        if self.pending_error is not None or self._resync_needed or not self._on_disk:
            self._prepare_disk()
        plan = self._plan(index, line)
        undo = Undo()
        try:
            if not plan.new_file and self._fd is None:
                self._fd = os.open(self.path / plan.catalog.name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            new_fd = commit_record(self.path, plan, images, self._fd, undo)
        except BaseException:
            if not undo.run():
                self._resync_needed = True
            raise
        self._apply(plan, new_fd)
        return index

    def _plan(self, index: int, line: bytes) -> Plan:
        current = self._catalog
        paths = list(self.catalog_paths)
        if current is None or len(current.line_lengths) >= self.max_len:
            name = f"catalog_{len(paths)}.catalog"
            paths.append(name)
            catalog = Catalog(name, index, time.time(), [len(line)])
            new_file, replaces_listed = True, False
        else:
            catalog = replace(current, line_lengths=[*current.line_lengths, len(line)])
            new_file = replaces_listed = not current.line_lengths  # the placeholder, or an empty catalog
        metadata = (self.manifest_metadata if self._session_started
                    else with_session(self.manifest_metadata, self.session_number, self.session_id))
        manifest = self._manifest_bytes(paths, index + 1, metadata)
        return Plan(index, line, catalog, paths, metadata, new_file, replaces_listed, self._sync_due(),
                    previous=current, manifest=manifest)

    def _apply(self, plan: Plan, new_fd: int | None) -> None:
        """The record is on disk: make the writer's state match."""
        if new_fd is not None:
            old_fd, self._fd = self._fd, new_fd
            if old_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(old_fd)
        self._catalog = plan.catalog
        self.catalog_paths = plan.catalog_paths
        self.current_index = plan.index + 1
        self.manifest_metadata = plan.manifest_metadata
        self._session_started = True
        if plan.sync:
            self._last_sync = time.monotonic()

    def _resync(self) -> None:
        """Rewrite both manifests (and cut the catalog) from memory, after a failed undo or a crash."""
        catalog = self._catalog
        if catalog is not None:
            path = self.path / catalog.name
            if catalog.size == 0 or path.stat().st_size != catalog.size:
                cut_catalog(path, catalog.size)
            _atomic_write(self.path / catalog.manifest_name, catalog.manifest_bytes(), sync=True)
        manifest = self._manifest_bytes(self.catalog_paths, self.current_index, self.manifest_metadata)
        _atomic_write(self.path / MANIFEST, manifest, sync=True)
        self._resync_needed = False

    def _sync_due(self) -> bool:
        return time.monotonic() - self._last_sync >= self.fsync_interval

    def _manifest_bytes(self, paths: list[str], current_index: int, manifest_metadata: dict[str, Any]) -> bytes:
        catalogs = {
            "paths": paths,
            "current_index": current_index,
            "max_len": self.max_len,
            "deleted_indexes": sorted(self.deleted_indexes),
        }
        return manifest_bytes(self.inputs, self.types, self.metadata, manifest_metadata, catalogs)

    # -- lifecycle ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.current_index - len(self.deleted_indexes)

    def _holds_only_placeholder(self) -> bool:
        """The tub on disk has no record, just this writer's placeholder (not DonkeyCar's empty tub)."""
        catalog = self._catalog
        if not (self._on_disk and self.current_index == 0 and self.catalog_paths == [FIRST_CATALOG]
                and catalog is not None and not catalog.line_lengths):
            return False
        with contextlib.suppress(OSError):
            return (self.path / FIRST_CATALOG).read_bytes() == PLACEHOLDER
        return False

    def close(self) -> None:
        """Make what was written durable (needs no free space); idempotent.

        A tub that got no record is removed, with the empty directories this writer made (see
        the module docstring). Raises OSError if syncing fails; the tub on disk stays consistent.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._resync_needed and self._on_disk:
                self._resync()
            if self._fd is not None:
                os.fsync(self._fd)
            if self._holds_only_placeholder():
                self._remove_placeholder()
            if self._on_disk:
                for name in (*self._catalog_manifest_names(), MANIFEST, "."):
                    _fsync_path(self.path / name)
            else:
                self._remove_created_dirs()
        finally:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)

    def _catalog_manifest_names(self) -> list[str]:
        return [] if self._catalog is None else [self._catalog.manifest_name]

    def _remove_placeholder(self) -> None:
        """Manifest first: a crash midway leaves no manifest, never one that lists a missing catalog."""
        for name in (MANIFEST, catalog_manifest_name(FIRST_CATALOG), FIRST_CATALOG):
            _unlink(self.path / name)
        self._on_disk = False

    def _remove_created_dirs(self) -> None:
        for directory in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: never anything but what this writer made

    def __enter__(self) -> TubWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
