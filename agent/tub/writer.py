"""A crash-safe, all-or-nothing writer for DonkeyCar Tub v2 (``donkeycar/parts/tub_v2.py``, ``datastore_v2.py``).

On-disk format, byte for byte as DonkeyCar 5.x writes it:

- ``manifest.json``: five JSON lines (inputs, types, user metadata, manifest metadata with
  ``created_at`` and ``sessions``, catalog metadata with ``paths``, ``current_index``,
  ``max_len``, ``deleted_indexes``);
- ``catalog_<n>.catalog``: one ``json.dumps(record, sort_keys=True)`` line per record, and
  ``catalog_<n>.catalog_manifest`` with the line lengths (characters, including ``\\n``);
- ``images/<index>_<key with / as _>_.jpg``, JPEG from Pillow's defaults.

What DonkeyCar's reader needs (``Tub(path, read_only=True)``, the reader its trainer uses; checked
against donkeycar 5.3): a non-empty ``manifest.json`` that lists at least one catalog (no
manifest: ``FileNotFoundError``; an empty one: ``cannot mmap an empty file``; ``paths: []``: it
tries to write its read-only map, ``AttributeError``), and for every listed catalog a non-empty
``.catalog`` file (an empty one: ``cannot mmap an empty file``, which is why DonkeyCar cannot
read-only open an empty tub of its own) plus its ``.catalog_manifest``. ``donkey-agent tub info``
needs only the five manifest lines. So the least DonkeyCar reads as "0 records" is a manifest
listing ``catalog_0.catalog`` whose content is a single ``\\n`` (its iterator stops at an empty
line) with ``line_lengths: []``: the *empty-tub placeholder* this writer puts down when it opens a
new tub. DonkeyCar's own writer (read-write) must not append behind that placeholder: its records
would hide behind the empty line (``len`` counts them, iteration yields none). So the placeholder
lives only while this writer has the tub open (or after a crash before the first record): the
first record replaces it, and ``close`` removes it if no record came.

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
import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agent.errors import AgentError

STANDARD_INPUTS = ("cam/image_array", "user/angle", "user/throttle", "user/mode")
STANDARD_TYPES = ("image_array", "float", "float", "str")
SUPPORTED_TYPES = {"float", "int", "str", "boolean", "nparray", "list", "vector", "image_array", "gray16_array"}
IMAGES_DIR = "images"
MANIFEST = "manifest.json"
FIRST_CATALOG = "catalog_0.catalog"
PLACEHOLDER = b"\n"  # an empty tub's catalog: DonkeyCar's iterator stops at the empty line
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # errors that pass when space returns

EncodedImage = tuple[str, bytes]  # file name, encoded bytes


class TubFormatError(AgentError, ValueError):
    """A tub on disk, or a record, that this writer cannot use; the message says why."""


def image_file_name(index: int, key: str, extension: str = ".jpg") -> str:
    """DonkeyCar's image naming, including its quirk of an ``_`` before the extension."""
    return "_".join([str(index), key.replace("/", "_"), extension])


def is_space_error(exc: BaseException) -> bool:
    """True for "disk full" and "quota exceeded": failures that end when space is freed."""
    return isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS


# -- file primitives: raw file descriptors, so a failed write leaves no buffered data behind ---------
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


def _fsync_path(path: Path) -> None:
    """Make a file's (or directory's) current contents durable; needs no free space."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_placeholder(fd: int) -> None:
    """Turn a catalog back into the empty-tub placeholder in place: no new block is needed.

    ``fd`` must not be ``O_APPEND`` (Linux's ``pwrite`` appends then). Killed in between, the
    catalog starts with an empty line: DonkeyCar still reads no record, and a writer repairs it.
    """
    os.pwrite(fd, PLACEHOLDER, 0)
    os.ftruncate(fd, len(PLACEHOLDER))


def _encode(image: Image.Image, fmt: str, key: str) -> bytes:
    """Encode in memory (the same bytes Pillow writes to a file) so the disk sees one plain write."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError) as exc:  # e.g. "cannot write mode RGBA as JPEG"
        raise TubFormatError(f"record key {key!r}: cannot encode a {image.mode} image as {fmt}: {exc}") from exc
    return buffer.getvalue()


def _session_date() -> str:
    return time.strftime("%y-%m-%d")


@dataclass(frozen=True)
class _Catalog:
    """One catalog as its ``.catalog_manifest`` describes it."""

    name: str
    start_index: int
    created_at: float
    line_lengths: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(self.line_lengths)

    @property
    def manifest_name(self) -> str:
        return Path(self.name).stem + ".catalog_manifest"

    def manifest_bytes(self) -> bytes:
        contents = {
            "created_at": self.created_at,
            "line_lengths": self.line_lengths,
            "path": self.manifest_name,
            "start_index": self.start_index,
        }
        return (json.dumps(contents, allow_nan=False, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class _Plan:
    """Everything one record changes, applied to the writer only once it is on disk."""

    index: int
    line: bytes
    catalog: _Catalog
    catalog_paths: list[str]
    manifest_metadata: dict[str, Any]
    new_file: bool  # the catalog file is (re)created with this line
    replaces_listed: bool  # ... and it replaces a catalog the manifest lists (the placeholder)
    sync: bool


class _Undo:
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
        self._catalog: _Catalog | None = None  # the last catalog, the one records go to
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
            self._remove_stale_tmp_files()
        sessions = self.manifest_metadata.get("sessions") or {}
        self.session_number = sessions["last_id"] + 1 if sessions else 0
        self.session_id = f"{_session_date()}_{self.session_number}"
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
            self._refuse_orphan_catalogs()
            self._write_placeholder()
        elif self._resync_needed:
            self._resync()
        self.pending_error = None

    def _make_dirs(self) -> None:
        for directory in (self.path, self.path / IMAGES_DIR):
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                self._created_dirs.append(directory)

    def _refuse_orphan_catalogs(self) -> None:
        """Records without a manifest are someone's data: never overwrite them with a new tub."""
        for catalog in self.path.glob("catalog_*.catalog"):
            if catalog.stat().st_size > len(PLACEHOLDER):
                raise TubFormatError(f"{self.path}: {catalog.name} holds records but there is no {MANIFEST}; "
                                     "not starting a new tub over them")

    def _write_placeholder(self) -> None:
        """Leave the least DonkeyCar reads as an empty tub; all three files or none of them."""
        catalog = _Catalog(FIRST_CATALOG, self.current_index, time.time())
        undo = _Undo()
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

    def _remove_stale_tmp_files(self) -> None:
        """A process killed between staging and renaming leaves a hidden tmp file: nobody reads it."""
        for pattern in (f".{MANIFEST}.tmp", ".catalog_*.catalog.tmp", ".catalog_*.catalog_manifest.tmp"):
            for tmp in self.path.glob(pattern):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _reopen_last_catalog(self) -> None:
        """Continue the last catalog, first cutting what a crash left beyond its manifest."""
        path = self.path / self.catalog_paths[-1]
        catalog_manifest = path.with_suffix(".catalog_manifest")
        try:
            contents = json.loads(catalog_manifest.read_text(encoding="utf-8").splitlines()[0])
            catalog = _Catalog(path.name, int(contents["start_index"]), float(contents["created_at"]),
                               list(contents["line_lengths"]))
            size = path.stat().st_size
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise TubFormatError(f"{catalog_manifest}: unreadable catalog manifest ({exc})") from exc
        # Keep the lines that are whole on disk (after a power cut the manifest can count more).
        kept, total = 0, 0
        for length in catalog.line_lengths:
            if total + length > size:
                break
            kept, total = kept + 1, total + length
        if kept < len(catalog.line_lengths):
            catalog = replace(catalog, line_lengths=catalog.line_lengths[:kept])
            self._resync_needed = True
        # A process killed between appending a line and updating the manifests leaves a tail
        # that no manifest counts: cut it (back to the placeholder if no line is counted; an
        # empty file, as DonkeyCar leaves an empty tub, stays: the first record replaces it).
        if total == 0 and size > 0 and (size != len(PLACEHOLDER) or path.read_bytes() != PLACEHOLDER):
            self._cut_catalog(path, 0)
        elif total > 0 and size > total:
            self._cut_catalog(path, total)
        recorded = catalog.start_index + len(catalog.line_lengths)
        if recorded != self.current_index:
            self.current_index = recorded
            self._resync_needed = True
        self._catalog = catalog

    @staticmethod
    def _cut_catalog(path: Path, size: int) -> None:
        """Truncate a catalog to ``size`` bytes, or to the placeholder for 0: frees space, needs none."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if size == 0:
                _restore_placeholder(fd)
            else:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

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
        contents, images = self._convert(record, index)
        contents["_timestamp_ms"] = round(time.time() * 1000)
        contents["_index"] = index
        contents["_session_id"] = self.session_id
        line = json.dumps(contents, allow_nan=False, sort_keys=True, ensure_ascii=True) + "\n"

        if self.pending_error is not None or self._resync_needed or not self._on_disk:
            self._prepare_disk()
        plan = self._plan(index, line.encode("ascii"))
        undo = _Undo()
        try:
            new_fd = self._commit(plan, images, undo)
        except BaseException:
            if not undo.run():
                self._resync_needed = True
            raise
        self._apply(plan, new_fd)
        return index

    def _plan(self, index: int, line: bytes) -> _Plan:
        current = self._catalog
        paths = list(self.catalog_paths)
        if current is None or len(current.line_lengths) >= self.max_len:
            name = f"catalog_{len(paths)}.catalog"
            paths.append(name)
            catalog = _Catalog(name, index, time.time(), [len(line)])
            new_file, replaces_listed = True, False
        else:
            catalog = replace(current, line_lengths=[*current.line_lengths, len(line)])
            new_file = replaces_listed = not current.line_lengths  # the placeholder, or an empty catalog
        metadata = self.manifest_metadata if self._session_started else self._with_session(self.manifest_metadata)
        return _Plan(index, line, catalog, paths, metadata, new_file, replaces_listed, self._sync_due())

    def _commit(self, plan: _Plan, images: list[EncodedImage], undo: _Undo) -> int | None:
        """Stage every byte, then rename; each step first registers how to undo it.

        Returns the descriptor of a newly created catalog file (None when the line was appended).
        """
        for name, data in images:
            image_path = self.path / IMAGES_DIR / name
            undo.push(partial(_unlink, image_path))
            _write_file(image_path, data)
        new_fd = self._stage_new_catalog(plan, undo) if plan.new_file else None
        if new_fd is None:
            self._append_line(plan, undo)
        elif self._fd is not None:
            os.fsync(self._fd)  # the full catalog being left behind is never written again
        catalog_manifest = self.path / plan.catalog.manifest_name
        catalog_manifest_tmp = self._stage(catalog_manifest, plan.catalog.manifest_bytes(), plan, undo)
        manifest = self._manifest_bytes(plan.catalog_paths, plan.index + 1, plan.manifest_metadata)
        manifest_tmp = self._stage(self.path / MANIFEST, manifest, plan, undo)
        # Commit: only renames from here on, and none of them needs free space.
        if new_fd is not None:
            catalog = self.path / plan.catalog.name
            _rename(_tmp_path(catalog), catalog)
            undo.push(self._undo_catalog_rename(plan))
        _rename(catalog_manifest_tmp, catalog_manifest)
        undo.push(self._undo_catalog_manifest_rename(plan))
        if plan.sync:
            _fsync_path(self.path)  # the renames so far; the manifest's is made durable by the next sync
        _rename(manifest_tmp, self.path / MANIFEST)
        return new_fd

    def _stage_new_catalog(self, plan: _Plan, undo: _Undo) -> int:
        """A catalog's first line goes into a temporary file, renamed over the placeholder at commit."""
        tmp = _tmp_path(self.path / plan.catalog.name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
        undo.push(partial(os.close, fd))
        undo.push(partial(_unlink, tmp))
        _write_all(fd, plan.line)
        if plan.sync:
            os.fsync(fd)
        return fd

    def _append_line(self, plan: _Plan, undo: _Undo) -> None:
        if self._fd is None:
            self._fd = os.open(self.path / plan.catalog.name, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        fd, previous = self._fd, plan.catalog.size - len(plan.line)
        undo.push(partial(os.ftruncate, fd, previous))
        _write_all(fd, plan.line)
        if plan.sync:
            os.fsync(fd)

    def _stage(self, path: Path, data: bytes, plan: _Plan, undo: _Undo) -> Path:
        tmp = _tmp_path(path)
        undo.push(partial(_unlink, tmp))
        _write_file(tmp, data, sync=plan.sync)
        return tmp

    def _undo_catalog_rename(self, plan: _Plan) -> Callable[[], None]:
        path = self.path / plan.catalog.name
        if plan.replaces_listed:
            return partial(self._cut_catalog, path, 0)  # back to the placeholder the manifest lists
        return partial(_unlink, path)  # a new catalog, listed nowhere yet

    def _undo_catalog_manifest_rename(self, plan: _Plan) -> Callable[[], None]:
        path = self.path / plan.catalog.manifest_name
        if plan.new_file and not plan.replaces_listed:
            return partial(_unlink, path)  # a new catalog's manifest, listed nowhere yet
        previous = self._catalog
        assert previous is not None
        # The only undo step that needs space: reached when the manifest's rename failed.
        return partial(_atomic_write, path, previous.manifest_bytes(), sync=False)

    def _apply(self, plan: _Plan, new_fd: int | None) -> None:
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
                self._cut_catalog(path, catalog.size)
            _atomic_write(self.path / catalog.manifest_name, catalog.manifest_bytes(), sync=True)
        manifest = self._manifest_bytes(self.catalog_paths, self.current_index, self.manifest_metadata)
        _atomic_write(self.path / MANIFEST, manifest, sync=True)
        self._resync_needed = False

    def _convert(self, record: Mapping[str, Any], index: int) -> tuple[dict[str, Any], list[EncodedImage]]:
        contents: dict[str, Any] = {}
        images: list[EncodedImage] = []
        for key, value in record.items():
            if value is None or key not in self._input_types:
                continue
            kind = self._input_types[key]
            try:
                if kind == "float":
                    number = float(value)
                    if not math.isfinite(number):
                        raise TubFormatError(f"record key {key!r}: {number} is not a finite number")
                    contents[key] = number
                elif kind == "int":
                    contents[key] = int(value)
                elif kind == "str":
                    contents[key] = str(value)
                elif kind == "boolean":
                    contents[key] = bool(value)
                elif kind == "nparray":
                    contents[key] = np.asarray(value).tolist()
                elif kind in ("list", "vector"):
                    contents[key] = [v.item() if isinstance(v, np.generic) else v for v in value]
                elif kind == "image_array":
                    array = np.asarray(value)
                    if array.ndim not in (2, 3) or array.size == 0:
                        raise TubFormatError(f"record key {key!r}: image of shape {array.shape} is not H×W[×C]")
                    name = image_file_name(index, key)
                    images.append((name, _encode(Image.fromarray(np.uint8(array)), "JPEG", key)))
                    contents[key] = name
                elif kind == "gray16_array":
                    name = image_file_name(index, key, ".png")
                    images.append((name, _encode(Image.fromarray(np.uint16(value)), "PNG", key)))
                    contents[key] = name
            except TubFormatError:
                raise
            except (TypeError, ValueError) as exc:
                raise TubFormatError(
                    f"record key {key!r}: cannot store {type(value).__name__} as {kind}: {exc}"
                ) from exc
        return contents, images

    def _sync_due(self) -> bool:
        return time.monotonic() - self._last_sync >= self.fsync_interval

    def _with_session(self, manifest_metadata: dict[str, Any]) -> dict[str, Any]:
        """The manifest metadata with this writer's session added (written with its first record)."""
        sessions = dict(manifest_metadata.get("sessions") or {"all_full_ids": []})
        sessions["last_id"] = self.session_number
        sessions["last_full_id"] = self.session_id
        sessions["all_full_ids"] = [*sessions.get("all_full_ids", []), self.session_id]
        return {**manifest_metadata, "sessions": sessions}

    def _manifest_bytes(self, paths: list[str], current_index: int, manifest_metadata: dict[str, Any]) -> bytes:
        catalogs = {
            "paths": paths,
            "current_index": current_index,
            "max_len": self.max_len,
            "deleted_indexes": sorted(self.deleted_indexes),
        }
        lines = [self.inputs, self.types, self.metadata, manifest_metadata, catalogs]
        return "".join(json.dumps(line) + "\n" for line in lines).encode()

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
        for name in (MANIFEST, Path(FIRST_CATALOG).stem + ".catalog_manifest", FIRST_CATALOG):
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
