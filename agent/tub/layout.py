"""The DonkeyCar Tub v2 format (``donkeycar/parts/tub_v2.py``, ``datastore_v2.py``): names and bytes.

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
line) with ``line_lengths: []``: the *empty-tub placeholder* the writer puts down when it opens a
new tub. DonkeyCar's own writer (read-write) must not append behind that placeholder: its records
would hide behind the empty line (``len`` counts them, iteration yields none). So the placeholder
lives only while our writer has the tub open (or after a crash before the first record): the
first record replaces it, and ``close`` removes it if no record came.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import AgentError

STANDARD_INPUTS = ("cam/image_array", "user/angle", "user/throttle", "user/mode")
STANDARD_TYPES = ("image_array", "float", "float", "str")
SUPPORTED_TYPES = {"float", "int", "str", "boolean", "nparray", "list", "vector", "image_array", "gray16_array"}
IMAGES_DIR = "images"
MANIFEST = "manifest.json"
FIRST_CATALOG = "catalog_0.catalog"
PLACEHOLDER = b"\n"  # an empty tub's catalog: DonkeyCar's iterator stops at the empty line


class TubFormatError(AgentError, ValueError):
    """A tub on disk, or a record, that this writer cannot use; the message says why."""


def image_file_name(index: int, key: str, extension: str = ".jpg") -> str:
    """DonkeyCar's image naming, including its quirk of an ``_`` before the extension."""
    return "_".join([str(index), key.replace("/", "_"), extension])


def catalog_manifest_name(catalog_name: str) -> str:
    return Path(catalog_name).stem + ".catalog_manifest"


def session_date() -> str:
    return time.strftime("%y-%m-%d")


@dataclass(frozen=True)
class Catalog:
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
        return catalog_manifest_name(self.name)

    def manifest_bytes(self) -> bytes:
        contents = {
            "created_at": self.created_at,
            "line_lengths": self.line_lengths,
            "path": self.manifest_name,
            "start_index": self.start_index,
        }
        return (json.dumps(contents, allow_nan=False, sort_keys=True) + "\n").encode()


def manifest_bytes(
    inputs: list[str],
    types: list[str],
    metadata: dict[str, Any],
    manifest_metadata: dict[str, Any],
    catalogs: dict[str, Any],
) -> bytes:
    """``manifest.json``: its five lines, in DonkeyCar's order."""
    lines = [inputs, types, metadata, manifest_metadata, catalogs]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def with_session(manifest_metadata: dict[str, Any], session_number: int, session_id: str) -> dict[str, Any]:
    """The manifest metadata with a writer's session added (written with its first record)."""
    sessions = dict(manifest_metadata.get("sessions") or {"all_full_ids": []})
    sessions["last_id"] = session_number
    sessions["last_full_id"] = session_id
    sessions["all_full_ids"] = [*sessions.get("all_full_ids", []), session_id]
    return {**manifest_metadata, "sessions": sessions}
