"""A crash-safe writer for DonkeyCar Tub v2 (``donkeycar/parts/tub_v2.py``, ``datastore_v2.py``).

On-disk format, byte for byte as DonkeyCar 5.x writes it:

- ``manifest.json``: five JSON lines (inputs, types, user metadata, manifest metadata with
  ``created_at`` and ``sessions``, catalog metadata with ``paths``, ``current_index``,
  ``max_len``, ``deleted_indexes``);
- ``catalog_<n>.catalog``: one ``json.dumps(record, sort_keys=True)`` line per record, and
  ``catalog_<n>.catalog_manifest`` with the line lengths (characters, including ``\\n``);
- ``images/<index>_<key with / as _>_.jpg``, JPEG from Pillow's defaults.

Unlike DonkeyCar's writer, every manifest is replaced atomically (write, then rename),
a catalog file is only created together with its first line (DonkeyCar cannot open a tub
with an empty catalog), and writes happen in an order that leaves a readable tub however
the process dies: image, then catalog line, then catalog manifest, then manifest.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

STANDARD_INPUTS = ("cam/image_array", "user/angle", "user/throttle", "user/mode")
STANDARD_TYPES = ("image_array", "float", "float", "str")
SUPPORTED_TYPES = {"float", "int", "str", "boolean", "nparray", "list", "vector", "image_array", "gray16_array"}
IMAGES_DIR = "images"
MANIFEST = "manifest.json"


PendingImage = tuple[str, Image.Image, str]  # file name, image, Pillow format


class TubFormatError(ValueError):
    """A tub on disk, or a record, that this writer cannot use; the message says why."""


def image_file_name(index: int, key: str, extension: str = ".jpg") -> str:
    """DonkeyCar's image naming, including its quirk of an ``_`` before the extension."""
    return "_".join([str(index), key.replace("/", "_"), extension])


def _atomic_write(path: Path, text: str, *, sync: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
    tmp.replace(path)


def _session_date() -> str:
    return time.strftime("%y-%m-%d")


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
        self.manifest_metadata: dict[str, Any] = {}
        self._line_lengths: list[int] = []  # of the current (last) catalog
        self._catalog_start = 0
        self._catalog_created_at = 0.0
        self._catalog_handle: Any = None
        self._session_started = False
        self._closed = False

        (self.path / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        if (self.path / MANIFEST).exists():
            self._load_existing()
        else:
            # The manifest appears with the first record: DonkeyCar cannot open a tub whose
            # manifest lists no catalog, nor one whose catalog is empty.
            self.manifest_metadata = {"created_at": time.time()}
        sessions = self.manifest_metadata.get("sessions") or {}
        self.session_number = sessions["last_id"] + 1 if sessions else 0
        self.session_id = f"{_session_date()}_{self.session_number}"

    # -- opening an existing tub --------------------------------------------------------
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
        if self.catalog_paths:
            self._reopen_last_catalog()

    def _reopen_last_catalog(self) -> None:
        catalog = self.path / self.catalog_paths[-1]
        catalog_manifest = catalog.with_suffix(".catalog_manifest")
        try:
            contents = json.loads(catalog_manifest.read_text(encoding="utf-8").splitlines()[0])
        except (ValueError, OSError, IndexError) as exc:
            raise TubFormatError(f"{catalog_manifest}: unreadable catalog manifest ({exc})") from exc
        self._line_lengths = list(contents["line_lengths"])
        self._catalog_start = int(contents["start_index"])
        self._catalog_created_at = float(contents["created_at"])
        # A process killed between appending a line and updating the manifests leaves a
        # tail that no manifest counts: cut it so the catalog and its manifest agree again.
        valid = sum(self._line_lengths)
        recorded = self._catalog_start + len(self._line_lengths)
        if recorded != self.current_index:
            self.current_index = recorded
        with catalog.open("r+", encoding="utf-8", newline="\n") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() != valid:
                handle.truncate(valid)

    # -- writing ---------------------------------------------------------------------------
    def write(self, record: Mapping[str, Any]) -> int:
        """Write one record (keys are the tub's inputs; None values are skipped). Returns its index.

        Raises TubFormatError, before anything is written, for a value that cannot be stored
        (a non-finite float, a wrong shape); the tub is unchanged.
        """
        if self._closed:
            raise TubFormatError(f"{self.path}: tub writer is closed")
        index = self.current_index
        contents, images = self._convert(record, index)
        contents["_timestamp_ms"] = round(time.time() * 1000)
        contents["_index"] = index
        contents["_session_id"] = self.session_id
        line = json.dumps(contents, allow_nan=False, sort_keys=True, ensure_ascii=True) + "\n"

        for name, image, fmt in images:
            image.save(self.path / IMAGES_DIR / name, format=fmt)
        if not self._session_started:
            self._start_session()
        if self._catalog_handle is None or len(self._line_lengths) >= self.max_len:
            self._open_catalog_for(index)
        self._catalog_handle.write(line)
        self._catalog_handle.flush()
        self._line_lengths.append(len(line))
        self.current_index = index + 1
        sync = self._sync_due()
        if sync:
            os.fsync(self._catalog_handle.fileno())
        self._write_catalog_manifest(sync=sync)
        self._write_manifest(sync=sync)
        return index

    def _convert(self, record: Mapping[str, Any], index: int) -> tuple[dict[str, Any], list[PendingImage]]:
        contents: dict[str, Any] = {}
        images: list[PendingImage] = []
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
                    images.append((name, Image.fromarray(np.uint8(array)), "JPEG"))
                    contents[key] = name
                elif kind == "gray16_array":
                    name = image_file_name(index, key, ".png")
                    images.append((name, Image.fromarray(np.uint16(value)), "PNG"))
                    contents[key] = name
            except TubFormatError:
                raise
            except (TypeError, ValueError) as exc:
                raise TubFormatError(
                    f"record key {key!r}: cannot store {type(value).__name__} as {kind}: {exc}"
                ) from exc
        return contents, images

    def _sync_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            self._last_sync = now
            return True
        return False

    def _start_session(self) -> None:
        sessions = dict(self.manifest_metadata.get("sessions") or {"all_full_ids": []})
        sessions["last_id"] = self.session_number
        sessions["last_full_id"] = self.session_id
        sessions["all_full_ids"] = [*sessions.get("all_full_ids", []), self.session_id]
        self.manifest_metadata["sessions"] = sessions
        self._session_started = True

    def _open_catalog_for(self, index: int) -> None:
        if self._catalog_handle is not None:
            os.fsync(self._catalog_handle.fileno())
            self._catalog_handle.close()
            self._catalog_handle = None
        if self.catalog_paths and len(self._line_lengths) < self.max_len:
            name = self.catalog_paths[-1]  # continue the last catalog of a reopened tub
        else:
            name = f"catalog_{len(self.catalog_paths)}.catalog"
            self.catalog_paths.append(name)
            self._line_lengths = []
            self._catalog_start = index
            self._catalog_created_at = time.time()
        # Opened only now, with a line about to be written: never an empty catalog on disk
        # for longer than the write takes, and never listed in the manifest before that.
        self._catalog_handle = (self.path / name).open("a", encoding="utf-8", newline="\n")

    def _write_catalog_manifest(self, *, sync: bool) -> None:
        name = Path(self.catalog_paths[-1]).stem + ".catalog_manifest"
        contents = {
            "created_at": self._catalog_created_at,
            "line_lengths": self._line_lengths,
            "path": name,
            "start_index": self._catalog_start,
        }
        _atomic_write(self.path / name, json.dumps(contents, allow_nan=False, sort_keys=True) + "\n", sync=sync)

    def _write_manifest(self, *, sync: bool) -> None:
        catalogs = {
            "paths": self.catalog_paths,
            "current_index": self.current_index,
            "max_len": self.max_len,
            "deleted_indexes": sorted(self.deleted_indexes),
        }
        lines = [self.inputs, self.types, self.metadata, self.manifest_metadata, catalogs]
        _atomic_write(self.path / MANIFEST, "".join(json.dumps(line) + "\n" for line in lines), sync=sync)

    # -- lifecycle ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.current_index - len(self.deleted_indexes)

    def close(self) -> None:
        """Flush and sync everything; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._catalog_handle is not None:
            self._catalog_handle.flush()
            os.fsync(self._catalog_handle.fileno())
            self._catalog_handle.close()
            self._catalog_handle = None
        if self.catalog_paths:
            self._write_catalog_manifest(sync=True)
            self._write_manifest(sync=True)

    def __enter__(self) -> TubWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
