"""Bundle tars: written flat, unpacked only when every member is a plain file of one flat bundle."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from agent.bundle.archive import pack_tar, unpack
from agent.bundle.errors import ArchiveError
from tests.bundles import MODEL, make_bundle

LIMIT = 64 * 1024 * 1024


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_pack_and_unpack(tmp_path: Path, suffix: str) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    archive = pack_tar(bundle, tmp_path / f"bundle{suffix}")
    out = tmp_path / "out"
    out.mkdir()
    assert unpack(archive, out, max_bytes=LIMIT) == ["manifest.json", "pilot.tflite"]
    assert (out / "pilot.tflite").read_bytes() == MODEL.read_bytes()


def test_a_tar_of_the_directory_itself_is_accepted(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "pilot-1.0.0")
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        tar.add(bundle, arcname="pilot-1.0.0")  # "pilot-1.0.0/", "pilot-1.0.0/manifest.json", ...
    out = tmp_path / "out"
    out.mkdir()
    assert unpack(tmp_path / "b.tar", out, max_bytes=LIMIT) == ["manifest.json", "pilot.tflite"]


def hostile(tmp_path: Path, *members: tarfile.TarInfo) -> Path:
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w") as tar:
        for member in members:
            data = b"x" * member.size if member.isreg() else None
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 4, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize(("members", "expected"), [
    ([member("/etc/cron.d/evil")], "an absolute path"),
    ([member("../evil")], "a path that leaves the bundle"),
    ([member("bundle/../../evil")], "a path that leaves the bundle"),
    ([member("model.tflite", tarfile.SYMTYPE, link="/etc/shadow")], "a link (to '/etc/shadow')"),
    ([member("a"), member("model.tflite", tarfile.LNKTYPE, link="a")], "a link (to 'a')"),
    ([member("dev", tarfile.CHRTYPE)], "a device, FIFO or other special file"),
    ([member("fifo", tarfile.FIFOTYPE)], "a device, FIFO or other special file"),
    ([member("a/b/c")], "a bundle's files sit at the top or in one directory"),
    ([member("a/b", tarfile.DIRTYPE)], "a nested directory"),
    ([member("x"), member("x")], "x appears twice"),
    ([member("one/x"), member("two/y")], "files in several directories"),
    ([member("x"), member("dir/y")], "files both at the top and in dir/"),
    ([member(f"f{i}") for i in range(40)], "more than 32 members"),
    ([member("big", size=LIMIT // 2), member("big2", size=LIMIT // 2 + 1)], "more than 67108864 bytes unpacked"),
    ([], "no files"),
])
def test_hostile_tars_are_refused_before_writing(tmp_path: Path, members: list[tarfile.TarInfo],
                                                 expected: str) -> None:
    archive = hostile(tmp_path, *members)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError) as caught:
        unpack(archive, out, max_bytes=LIMIT)
    assert expected in str(caught.value)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100])
def test_not_a_tar(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "b.tar").write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=r"not a readable tar file|no files"):
        unpack(tmp_path / "b.tar", out, max_bytes=LIMIT)


def test_a_truncated_tar_leaves_an_error_not_a_short_file(tmp_path: Path) -> None:
    archive = pack_tar(make_bundle(tmp_path / "bundle"), tmp_path / "b.tar")
    archive.write_bytes(archive.read_bytes()[:2_000_000])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError, match=r"truncated|not a readable tar"):
        unpack(archive, out, max_bytes=LIMIT)
    assert list(out.iterdir()) == []
