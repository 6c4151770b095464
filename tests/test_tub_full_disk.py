"""A full disk never stops recording, never leaves an unreadable tub, and every lost record is counted.

The oracle is DonkeyCar's own reader. Failures are injected at each step of a write (unit tests,
anywhere), and produced for real on a small tmpfs (mounting one needs root: those tests skip
otherwise).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.tub import TubRecorder, TubWriter
from agent.tub import commit as writer_module
from tests.conftest import import_donkeycar_tub, read_with_donkeycar
from tests.test_tub import record

pytestmark = pytest.mark.donkeycar

PAGE = 4096


def enospc(name: str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)


def files(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: the tub's whole on-disk state."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def check_consistent(path: Path) -> int:
    """Catalog lines == catalog manifests == manifest count == what DonkeyCar reads; no stray file."""
    catalogs = json.loads((path / "manifest.json").read_text().splitlines()[4])
    total = 0
    for name in catalogs["paths"]:
        lines = [line for line in (path / name).read_text().splitlines() if line]  # the placeholder is ""
        manifest = json.loads((path / name).with_suffix(".catalog_manifest").read_text())
        assert manifest["line_lengths"] == [len(line) + 1 for line in lines], name
        assert manifest["start_index"] == total, name
        total += len(lines)
    assert catalogs["current_index"] == total
    assert not [p.name for p in path.rglob("*.tmp")]
    length, records, _ = read_with_donkeycar(path)
    assert length == len(records) == total
    assert [r["_index"] for r in records] == list(range(total))
    images = sorted(r["cam/image_array"] for r in records if "cam/image_array" in r)
    assert sorted(p.name for p in (path / "images").iterdir()) == images  # none left by an undone record
    return total


# -- injected failures: each step of a write, with the partial write a full disk really does -----
class Faults:
    """Makes the next write to (or rename onto) a matching file fail like a full disk does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.write_rule: Callable[[str], bool] | None = None
        self.rename_rule: Callable[[str], bool] | None = None
        self.fsync_fails = False
        self._write_all = writer_module._write_all
        self._rename = writer_module._rename
        monkeypatch.setattr(writer_module, "_write_all", self.write_all)
        monkeypatch.setattr(writer_module, "_rename", self.rename)
        real_fsync_path = writer_module._fsync_path

        def fsync_path(path: Path) -> None:
            if self.fsync_fails and path.is_dir():
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
            real_fsync_path(path)

        monkeypatch.setattr(writer_module, "_fsync_path", fsync_path)

    def write_all(self, fd: int, data: bytes) -> None:
        name = Path(f"/proc/self/fd/{fd}").readlink().name
        if self.write_rule is not None and self.write_rule(name):
            self.write_rule = None
            os.write(fd, data[: len(data) // 2])  # the disk fills part way through
            raise enospc(name)
        self._write_all(fd, data)

    def rename(self, source: Path, target: Path) -> None:
        if self.rename_rule is not None and self.rename_rule(target.name):
            self.rename_rule = None
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))  # renames do not need space
        self._rename(source, target)

    def arm(self, step: str) -> int:
        """Fail ``step`` once; returns the errno the write must raise."""
        writes = {
            "image": lambda n: n.endswith(".jpg"),
            "catalog line": lambda n: n.endswith((".catalog", ".catalog.tmp")),
            "catalog manifest": lambda n: n.endswith(".catalog_manifest.tmp"),
            "manifest": lambda n: n == ".manifest.json.tmp",
        }
        renames = {
            "rename catalog": lambda n: n.endswith(".catalog"),
            "rename catalog manifest": lambda n: n.endswith(".catalog_manifest"),
            "rename manifest": lambda n: n == "manifest.json",
        }
        if step in writes:
            self.write_rule = writes[step]
            return errno.ENOSPC
        if step in renames:
            self.rename_rule = renames[step]
            return errno.EIO
        assert step == "sync directory"
        self.fsync_fails = True
        return errno.EIO

    def disarm(self) -> None:
        self.write_rule = self.rename_rule = None
        self.fsync_fails = False


WRITE_STEPS = ["image", "catalog line", "catalog manifest", "manifest", "rename catalog manifest",
               "rename manifest", "sync directory"]
CASES = [
    *[("first record", step) for step in [*WRITE_STEPS, "rename catalog"]],  # replaces the placeholder
    *[("appended record", step) for step in WRITE_STEPS],
    *[("record opening catalog 1", step) for step in [*WRITE_STEPS, "rename catalog"]],
]


@pytest.mark.parametrize(("case", "step"), CASES)
def test_a_failed_write_is_undone_at_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                                                step: str) -> None:
    import_donkeycar_tub()
    path = tmp_path / "tub"
    before_count = {"first record": 0, "appended record": 2, "record opening catalog 1": 3}[case]
    writer = TubWriter(path, max_catalog_len=3, fsync_interval=0)
    for i in range(before_count):
        writer.write(record(i))
    before = files(path)
    faults = Faults(monkeypatch)

    expected_errno = faults.arm(step)
    with pytest.raises(OSError) as raised:
        writer.write(record(before_count))
    assert raised.value.errno == expected_errno
    assert files(path) == before  # byte for byte: no image, no line, no tmp file, no manifest change
    assert writer.current_index == before_count
    assert check_consistent(path) == before_count

    faults.disarm()  # space is back: writing continues where it was
    assert writer.write(record(before_count)) == before_count
    writer.close()
    assert check_consistent(path) == before_count + 1


def test_a_failed_undo_is_repaired_by_the_next_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one undo step that needs space: restoring a catalog manifest after the manifest's rename failed."""
    import_donkeycar_tub()
    path = tmp_path / "tub"
    writer = TubWriter(path)
    writer.write(record(0))
    faults = Faults(monkeypatch)
    faults.arm("rename manifest")
    real_write_file = writer_module._write_file

    def no_space_for_the_restore(target: Path, data: bytes, *, sync: bool = False) -> None:
        if target.name.endswith(".catalog_manifest.tmp") and faults.rename_rule is None:
            raise enospc(target.name)
        real_write_file(target, data, sync=sync)

    monkeypatch.setattr(writer_module, "_write_file", no_space_for_the_restore)
    with pytest.raises(OSError):
        writer.write(record(1))
    assert not list(path.rglob("*.tmp"))
    length, records, _ = read_with_donkeycar(path)  # DonkeyCar iterates lines: still exactly one record
    assert length == len(records) == 1
    monkeypatch.setattr(writer_module, "_write_file", real_write_file)
    assert writer.write(record(1)) == 1  # re-synchronises both manifests first
    writer.close()
    assert check_consistent(path) == 2


def test_reopening_after_a_power_cut_keeps_only_whole_lines(tmp_path: Path) -> None:
    """A catalog shorter than its manifest says (data lost, manifest kept) is cut to whole lines, never padded."""
    path = tmp_path / "tub"
    with TubWriter(path) as writer:
        for i in range(4):
            writer.write(record(i))
    catalog = path / "catalog_0.catalog"
    lengths = json.loads((path / "catalog_0.catalog_manifest").read_text())["line_lengths"]
    os.truncate(catalog, sum(lengths[:2]) + 10)  # two whole lines and part of the third survived
    with TubWriter(path) as writer:
        assert writer.current_index == 2
        assert writer.write(record(2)) == 2
    assert b"\0" not in catalog.read_bytes()
    (path / "images" / "3_cam_image_array_.jpg").unlink()  # the record the cut dropped
    assert check_consistent(path) == 3


def test_reopening_after_a_kill_mid_commit_cleans_up(tmp_path: Path) -> None:
    """Killed after the first line replaced the placeholder, before the manifests, with tmp files staged."""
    path = tmp_path / "tub"
    TubWriter(path)  # never closed: killed
    (path / "catalog_0.catalog").write_text(json.dumps({"_index": 0, "user/mode": "user"}) + "\n")
    (path / ".manifest.json.tmp").write_text("[")
    (path / ".catalog_0.catalog_manifest.tmp").write_text("{")
    assert read_with_donkeycar(path)[0] == 0  # len from the manifest; the line is not counted
    with TubWriter(path) as writer:
        assert (path / "catalog_0.catalog").read_bytes() == b"\n"  # back to the placeholder
        assert not list(path.glob(".*.tmp"))
        assert writer.write(record(0)) == 0
    assert check_consistent(path) == 1


def test_a_new_tub_never_overwrites_records_without_a_manifest(tmp_path: Path) -> None:
    from agent.tub import TubFormatError

    path = tmp_path / "tub"
    with TubWriter(path) as writer:
        writer.write(record(0))
    (path / "manifest.json").unlink()
    with pytest.raises(TubFormatError, match=r"holds records but there is no manifest\.json"):
        TubWriter(path)


# -- the recorder: never raises, counts everything, backs off, logs a little ------------------------
class Disk:
    """A writer's disk that can be full; counts the write attempts that reached it."""

    def __init__(self) -> None:
        self.full = False
        self.attempts = 0
        self.failed_attempts = 0


class FlakyWriter(TubWriter):
    def __init__(self, path: Path, disk: Disk) -> None:
        super().__init__(path)
        self.disk = disk

    def write(self, record):
        self.disk.attempts += 1
        try:
            if self.disk.full:
                raise enospc(str(self.path))
            return super().write(record)
        except OSError:
            self.disk.failed_attempts += 1
            raise


def submit_at(recorder: TubRecorder, hz: float, seconds: float, start: int = 0) -> int:
    """Submit frames at ``hz`` like the drive loop does; returns how many."""
    count = round(hz * seconds)
    for i in range(count):
        assert recorder.submit(record(start + i)) in (True, False)
        time.sleep(1 / hz)
    return count


def test_a_failing_disk_is_backed_off_counted_and_logged_a_little(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import_donkeycar_tub()
    disk = Disk()
    recorder = TubRecorder(FlakyWriter(tmp_path / "tub", disk), backoff=0.5, log_interval=1.0)
    submit_at(recorder, 20, 0.5)
    disk.full = True
    with caplog.at_level(logging.WARNING, logger="agent.tub.recorder"):
        full_from = time.monotonic()
        submit_at(recorder, 20, 2.5, start=10)
        full_for = time.monotonic() - full_from
        disk.full = False
        submit_at(recorder, 20, 1.0, start=60)
        recorder.close()
    stats = recorder.stats()
    assert stats["submitted"] == 80 == recorder.written + recorder.lost
    assert recorder.failed == disk.failed_attempts + recorder.backed_off
    assert disk.failed_attempts <= full_for / 0.5 + 2  # one attempt per back-off, not one per frame
    assert recorder.backed_off >= 30
    assert recorder.written >= 10 + 5  # before, and again after space came back
    assert check_consistent(tmp_path / "tub") == recorder.written
    lines = [r.getMessage() for r in caplog.records]
    assert 2 <= len(lines) <= 6, lines  # the first failure, a summary a second, resumed, closed
    assert "No space left on device" in lines[0]
    assert stats["last_error"] is not None and "No space left" in str(stats["last_error"])


def test_close_returns_within_its_timeout_when_a_write_hangs(tmp_path: Path) -> None:
    release = threading.Event()

    class HangingWriter(TubWriter):
        def write(self, record):
            release.wait(10)
            return super().write(record)

    recorder = TubRecorder(HangingWriter(tmp_path / "tub"), capacity=8)
    for i in range(5):
        recorder.submit(record(i))
    time.sleep(0.05)  # the thread is now inside the first write
    started = time.monotonic()
    recorder.close(timeout=0.3)
    assert time.monotonic() - started < 1.0
    final = recorder.stats()
    assert final["unwritten"] == 5 and final["written"] == 0
    assert final["submitted"] == final["written"] + final["lost"]  # type: ignore[operator]
    release.set()  # the write returns: the counts close reported stay final
    recorder._thread.join(5)
    assert recorder.stats() == final
    assert recorder.submit(record(9)) is False and recorder.dropped == 1


def test_close_never_raises(tmp_path: Path) -> None:
    class FailingClose(TubWriter):
        def close(self) -> None:
            super().close()
            raise enospc("manifest.json")

    recorder = TubRecorder(FailingClose(tmp_path / "tub"))
    recorder.submit(record(0))
    recorder.close()
    recorder.close()
    assert recorder.written == 1 and "No space left" in str(recorder.last_error)
    assert "1 of 1 records written" in recorder.summary()


# -- a real full disk: a 512 KiB tmpfs ------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a 512 KiB tmpfs to fill needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave_pages: int = 0) -> list[Path]:
    """Fill ``disk`` with one-page files, then free ``leave_pages`` of them; returns the rest."""
    fillers: list[Path] = []
    while True:
        filler = disk / f"filler-{len(fillers)}"
        try:
            filler.write_bytes(b"\0" * PAGE)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            filler.unlink(missing_ok=True)
            break
        fillers.append(filler)
    for filler in fillers[len(fillers) - leave_pages :] if leave_pages else []:
        filler.unlink()
    return fillers[: len(fillers) - leave_pages]


def free(fillers: list[Path]) -> None:
    for filler in fillers:
        filler.unlink(missing_ok=True)


def long_line(i: int) -> dict[str, object]:
    return {"user/mode": f"{i}:" + "x" * 1400}  # a 1.5 KB catalog line: page boundaries fall inside lines


# Text-only tub, disk filled after ``pre`` records: the next write runs out of space in the new
# catalog over the placeholder (0), a catalog manifest's tmp (1, 3, 4, 6), part way through
# appending the line (2), or in catalog 1's first line (5). With frames, in an image or a tmp.
REAL_CASES = [*[("text", pre, 0) for pre in range(7)], *[("frames", 3, leave) for leave in range(4)]]


@pytest.mark.parametrize(("kind", "pre", "leave_pages"), REAL_CASES)
def test_a_real_full_disk_leaves_a_consistent_tub_after_every_failure(small_disk: Path, kind: str, pre: int,
                                                                      leave_pages: int) -> None:
    import_donkeycar_tub()
    path = small_disk / "tub"
    if kind == "text":
        writer, make = TubWriter(path, ["user/mode"], ["str"], max_catalog_len=5, fsync_interval=0), long_line
    else:
        writer, make = TubWriter(path, max_catalog_len=5, fsync_interval=0), record
    for i in range(pre):
        writer.write(make(i))
    fillers = fill(small_disk, leave_pages)
    failures = 0
    while failures < 3:
        try:
            writer.write(make(writer.current_index))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            failures += 1
            assert check_consistent(path) == writer.current_index
    free(fillers)
    written = writer.current_index
    for i in range(written, written + 6):
        assert writer.write(make(i)) == i
    writer.close()
    assert check_consistent(path) == written + 6


def test_recording_at_20_hz_through_a_full_disk_counts_every_loss(small_disk: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import_donkeycar_tub()
    path = small_disk / "tub"
    fillers = fill(small_disk, leave_pages=24)  # room for about 20 records
    disk = Disk()
    recorder = TubRecorder(FlakyWriter(path, disk))
    with caplog.at_level(logging.WARNING, logger="agent.tub.recorder"):
        full_from = time.monotonic()
        submitted = submit_at(recorder, 20, 3.0)
        full_for = time.monotonic() - full_from
        assert recorder.failed > 0, "the disk should have filled"
        written_while_full = recorder.written
        free(fillers)
        submitted += submit_at(recorder, 20, 2.0, start=submitted)
        started = time.monotonic()
        recorder.close()
        assert time.monotonic() - started < 10.0
    assert recorder.submitted == submitted == recorder.written + recorder.lost
    assert recorder.failed == disk.failed_attempts + recorder.backed_off and recorder.backed_off > 0
    assert disk.failed_attempts <= full_for + 2  # about one attempt a second while full
    assert recorder.written > written_while_full + 10  # resumed once space was back
    assert check_consistent(path) == recorder.written
    assert len(caplog.records) <= 5, [r.getMessage() for r in caplog.records]


def test_a_recorder_started_on_a_full_disk_never_raises_and_leaves_no_file(small_disk: Path) -> None:
    path = small_disk / "tub"
    fill(small_disk)  # not one byte free: not even the empty-tub placeholder fits
    writer = TubWriter(path)
    assert writer.pending_error is not None and writer.pending_error.errno == errno.ENOSPC
    assert files(path) == {}  # no manifest, no half-written or temporary file
    recorder = TubRecorder(writer)
    submit_at(recorder, 20, 1.0)
    started = time.monotonic()
    recorder.close(timeout=5.0)
    assert time.monotonic() - started < 1.0
    stats = recorder.stats()
    assert (stats["submitted"], stats["written"], stats["failed"], stats["lost"]) == (20, 0, 20, 20)
    assert "No space left" in str(stats["last_error"])
    assert not path.exists()  # nothing was recorded, and nothing is left


def test_a_nearly_full_disk_gets_a_readable_empty_tub_then_records(small_disk: Path) -> None:
    from agent.cli import tub_info

    import_donkeycar_tub()
    path = small_disk / "tub"
    fillers = fill(small_disk, leave_pages=3)  # the placeholder's three files, and not one image more
    disk = Disk()
    recorder = TubRecorder(FlakyWriter(path, disk))
    assert recorder.writer.pending_error is None
    submit_at(recorder, 20, 0.5)
    assert recorder.failed > 0 and recorder.written == 0
    assert read_with_donkeycar(path)[:2] == (0, [])  # readable all along: 0 records
    assert tub_info(path)["records"] == 0
    free(fillers)
    submit_at(recorder, 20, 2.0, start=10)
    recorder.close()
    assert recorder.written > 10
    assert check_consistent(path) == recorder.written
