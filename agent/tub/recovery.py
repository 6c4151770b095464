"""Continuing a tub found on disk: read its last catalog back and cut what a crash left behind.

A writer killed at any step leaves one of the states tabled in ``agent.tub.writer``; these
functions bring each back to what the manifests count, so the writer can continue. Cutting a
catalog frees space and needs none (truncate, overwrite one byte in place), which is also why
the writer's undo uses ``cut_catalog``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path

from agent.tub.layout import MANIFEST, PLACEHOLDER, Catalog, TubFormatError


def restore_placeholder(fd: int) -> None:
    """Turn a catalog back into the empty-tub placeholder in place: no new block is needed.

    ``fd`` must not be ``O_APPEND`` (Linux's ``pwrite`` appends then). Killed in between, the
    catalog starts with an empty line: DonkeyCar still reads no record, and a writer repairs it.
    """
    os.pwrite(fd, PLACEHOLDER, 0)
    os.ftruncate(fd, len(PLACEHOLDER))


def cut_catalog(path: Path, size: int) -> None:
    """Truncate a catalog to ``size`` bytes, or to the placeholder for 0: frees space, needs none."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if size == 0:
            restore_placeholder(fd)
        else:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def refuse_orphan_catalogs(tub: Path) -> None:
    """Records without a manifest are someone's data: never overwrite them with a new tub."""
    for catalog in tub.glob("catalog_*.catalog"):
        if catalog.stat().st_size > len(PLACEHOLDER):
            raise TubFormatError(f"{tub}: {catalog.name} holds records but there is no {MANIFEST}; "
                                 "not starting a new tub over them")


def remove_stale_tmp_files(tub: Path) -> None:
    """A process killed between staging and renaming leaves a hidden tmp file: nobody reads it."""
    for pattern in (f".{MANIFEST}.tmp", ".catalog_*.catalog.tmp", ".catalog_*.catalog_manifest.tmp"):
        for tmp in tub.glob(pattern):
            with contextlib.suppress(OSError):
                tmp.unlink()


def reopen_catalog(path: Path) -> tuple[Catalog, bool]:
    """The catalog at ``path`` as its manifest counts it, first cutting what a crash left beyond that.

    Returns the catalog (only the lines whole on disk) and whether its manifest counted more
    lines than that, after a power cut: the manifests must then be rewritten.
    """
    catalog_manifest = path.with_suffix(".catalog_manifest")
    try:
        contents = json.loads(catalog_manifest.read_text(encoding="utf-8").splitlines()[0])
        catalog = Catalog(path.name, int(contents["start_index"]), float(contents["created_at"]),
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
    shortened = kept < len(catalog.line_lengths)
    if shortened:
        catalog = replace(catalog, line_lengths=catalog.line_lengths[:kept])
    # A process killed between appending a line and updating the manifests leaves a tail
    # that no manifest counts: cut it (back to the placeholder if no line is counted; an
    # empty file, as DonkeyCar leaves an empty tub, stays: the first record replaces it).
    if total == 0 and size > 0 and (size != len(PLACEHOLDER) or path.read_bytes() != PLACEHOLDER):
        cut_catalog(path, 0)
    elif total > 0 and size > total:
        cut_catalog(path, total)
    return catalog, shortened
