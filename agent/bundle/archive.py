"""Bundles as tar files (``.tar``, ``.tar.gz``): written for delivery, unpacked safely on the car.

A bundle arrives from a server, an inbox or a USB stick, so its tar is untrusted until the signature
inside verifies, and the signature can only be checked after unpacking. Unpacking therefore refuses,
before writing anything: absolute paths, ``..``, links (symbolic and hard), devices, FIFOs, anything
below a second directory level, duplicate names, more than ``max_members`` members and more than
``max_bytes`` in total. The accepted shapes are the files at the top (``tar -C DIR -cf b.tar .``) or
inside one directory (``tar -cf b.tar DIR``). The standard library's ``data`` filter runs as well,
as a second line.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO

from agent.bundle.errors import ArchiveError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_MEMBERS = 32


def is_archive(path: Path) -> bool:
    return path.name.endswith(ARCHIVE_SUFFIXES)


def pack_tar(bundle: Path, output: Path) -> Path:
    """Write a bundle directory as a tar (gzip when ``output`` ends in .gz or .tgz), files at the top."""
    gzip = output.name.endswith((".gz", ".tgz"))
    with tarfile.open(output, "w:gz") if gzip else tarfile.open(output, "w") as archive:
        for path in sorted(bundle.iterdir()):
            if path.is_symlink() or not path.is_file():
                raise ArchiveError(f"{path}: a bundle holds only regular files")
            archive.add(path, arcname=path.name, recursive=False, filter=_plain)
    return output


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def unpack(archive: Path, destination: Path, *, max_bytes: int, max_members: int = MAX_MEMBERS) -> list[str]:
    """Extract a bundle tar's files flat into ``destination`` (an existing empty directory).

    Returns the file names. Raises ArchiveError naming the first member that is not a plain file of a
    flat bundle, or the limit exceeded; nothing is written unless every member passes.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _check_members(tar, archive, max_bytes, max_members)
            free = shutil.disk_usage(destination).free
            total = sum(member.size for member, _ in members)
            if total > free:
                raise ArchiveError(f"{archive}: needs {total} bytes to unpack, {free} free in {destination}")
            names: list[str] = []
            try:
                for member, name in members:
                    reader = tar.extractfile(tarfile.data_filter(member, str(destination)))
                    if reader is None:
                        raise ArchiveError(f"{archive}: {member.name}: cannot be read as a file")
                    names.append(name)
                    with reader, (destination / name).open("xb") as writer:
                        copied = _copy_exactly(reader, writer, member.size)
                    if copied != member.size:
                        raise ArchiveError(f"{archive}: {member.name}: truncated ({copied} of {member.size} bytes)")
            except BaseException:
                for name in names:  # a half-unpacked bundle must not look like a bundle
                    (destination / name).unlink(missing_ok=True)
                raise
            return names
    except tarfile.FilterError as exc:
        raise ArchiveError(f"{archive}: refused by the tar data filter: {exc}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename == str(archive):
            raise ArchiveError(f"{archive}: no such file") from None
        raise ArchiveError(f"{archive}: not a readable tar file ({type(exc).__name__}: {exc})") from None


def _copy_exactly(reader: IO[bytes], writer: IO[bytes], size: int) -> int:
    copied = 0
    while copied < size:
        chunk = reader.read(min(1024 * 1024, size - copied))
        if not chunk:
            break
        writer.write(chunk)
        copied += len(chunk)
    return copied


def _check_members(tar: tarfile.TarFile, archive: Path, max_bytes: int,
                   max_members: int) -> list[tuple[tarfile.TarInfo, str]]:
    files: list[tuple[tarfile.TarInfo, str]] = []
    seen: set[str] = set()
    top: set[str] = set()
    total = 0
    for count, member in enumerate(tar, start=1):
        if count > max_members:
            raise ArchiveError(f"{archive}: more than {max_members} members; a bundle has a few files")
        where = f"{archive}: {member.name!r}"
        path = PurePosixPath(member.name)
        if path.is_absolute() or member.name.startswith("/"):
            raise ArchiveError(f"{where}: an absolute path")
        parts = [part for part in path.parts if part != "."]
        if ".." in parts:
            raise ArchiveError(f"{where}: a path that leaves the bundle (..)")
        if member.issym() or member.islnk():
            raise ArchiveError(f"{where}: a link (to {member.linkname!r}); a bundle holds only regular files")
        if member.isdir():
            if len(parts) > 1:
                raise ArchiveError(f"{where}: a nested directory; a bundle is flat")
            top.update(parts)
            continue
        if not member.isreg():
            raise ArchiveError(f"{where}: a device, FIFO or other special file")
        if len(parts) == 0 or len(parts) > 2:
            raise ArchiveError(f"{where}: a bundle's files sit at the top or in one directory")
        if len(parts) == 2:
            top.add(parts[0])
        name = parts[-1]
        if name in seen:
            raise ArchiveError(f"{where}: {name} appears twice")
        seen.add(name)
        total += member.size
        if total > max_bytes:
            raise ArchiveError(f"{archive}: more than {max_bytes} bytes unpacked (the limit, models.max_bundle_mb)")
        files.append((member, name))
    if len(top) > 1:
        raise ArchiveError(f"{archive}: files in several directories ({', '.join(sorted(top))}); a bundle is one")
    if any(len([p for p in PurePosixPath(member.name).parts if p != "."]) == 1 for member, _ in files) and top:
        raise ArchiveError(f"{archive}: files both at the top and in {next(iter(top))}/; a bundle is one directory")
    if not files:
        raise ArchiveError(f"{archive}: no files")
    return files
