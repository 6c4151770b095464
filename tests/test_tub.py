"""The Tub v2 writer against DonkeyCar's own reader, writer and training data pipeline."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.tub import STANDARD_INPUTS, STANDARD_TYPES, TubFormatError, TubRecorder, TubWriter
from tests.conftest import import_donkeycar_tub, read_with_donkeycar

pytestmark = pytest.mark.donkeycar


def frame(i: int) -> np.ndarray:
    """A smooth, index-dependent image (JPEG keeps it close; each index differs)."""
    rows, cols = np.mgrid[0:120, 0:160]
    image = np.stack([rows * 2, cols * 1.5, np.full_like(rows, 10 * i)], axis=-1)
    image[40:80, 60 + i : 100 + i] = (250, 250, 250)
    return np.clip(image, 0, 255).astype(np.uint8)


def record(i: int) -> dict[str, object]:
    return {
        "cam/image_array": frame(i),
        "user/angle": np.float32(i / 100 - 0.5),
        "user/throttle": 0.25,
        "user/mode": "user" if i % 2 else "local",
    }


def test_donkeycar_reads_every_record_we_write(tmp_path: Path) -> None:
    import_donkeycar_tub()
    with TubWriter(tmp_path / "tub", max_catalog_len=7, metadata={"car": "twin"}) as writer:
        for i in range(20):
            assert writer.write(record(i)) == i

    length, records, manifest = read_with_donkeycar(tmp_path / "tub")
    assert length == 20
    assert [r["_index"] for r in records] == list(range(20))
    assert records[3]["user/angle"] == pytest.approx(3 / 100 - 0.5, abs=1e-6)
    assert records[3]["user/mode"] == "user"
    assert records[4]["cam/image_array"] == "4_cam_image_array_.jpg"
    assert manifest.metadata == {"car": "twin"}
    assert manifest.catalog_paths == ["catalog_0.catalog", "catalog_1.catalog", "catalog_2.catalog"]
    image = np.asarray(Image.open(tmp_path / "tub" / "images" / records[4]["cam/image_array"]))
    assert image.shape == (120, 160, 3)
    # JPEG is lossy but close; and the image is the one for its own index, not a neighbour's.
    assert np.abs(image.astype(int) - frame(4).astype(int)).mean() < 3
    assert np.abs(image.astype(int) - frame(6).astype(int)).mean() > 6


def test_files_match_what_donkeycar_writes(tmp_path: Path) -> None:
    """Same inputs through DonkeyCar's Tub and our writer: same manifest shape, records and JPEG bytes."""
    Tub = import_donkeycar_tub()
    theirs = Tub(str(tmp_path / "theirs"), inputs=list(STANDARD_INPUTS), types=list(STANDARD_TYPES))
    with TubWriter(tmp_path / "ours") as ours:
        for i in range(3):
            theirs.write_record(record(i))
            ours.write(record(i))
    theirs.close()

    def lines(name: str, file: str) -> list[object]:
        return [json.loads(line) for line in (tmp_path / name / file).read_text().splitlines()]

    their_manifest, our_manifest = lines("theirs", "manifest.json"), lines("ours", "manifest.json")
    assert len(our_manifest) == len(their_manifest) == 5
    assert our_manifest[:3] == their_manifest[:3]
    assert our_manifest[4] == their_manifest[4]
    assert set(our_manifest[3]) == set(their_manifest[3]) == {"created_at", "sessions"}
    assert our_manifest[3]["sessions"] == their_manifest[3]["sessions"]

    def untimed(name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "_timestamp_ms"} for r in lines(name, "catalog_0.catalog")]

    assert untimed("ours") == untimed("theirs")
    their_cm = lines("theirs", "catalog_0.catalog_manifest")[0]
    our_cm = lines("ours", "catalog_0.catalog_manifest")[0]
    assert our_cm["line_lengths"] == their_cm["line_lengths"]  # same digits in every timestamp
    assert sorted(our_cm) == sorted(their_cm)
    for i in range(3):
        name = f"{i}_cam_image_array_.jpg"
        ours, theirs = (tmp_path / side / "images" / name for side in ("ours", "theirs"))
        assert ours.read_bytes() == theirs.read_bytes()


def test_catalog_line_lengths_are_exact(tmp_path: Path) -> None:
    with TubWriter(tmp_path / "tub") as writer:
        for i in range(5):
            writer.write(record(i))
    catalog = (tmp_path / "tub" / "catalog_0.catalog").read_text()
    manifest = json.loads((tmp_path / "tub" / "catalog_0.catalog_manifest").read_text())
    assert manifest["line_lengths"] == [len(line) + 1 for line in catalog.splitlines()]
    assert manifest["path"] == "catalog_0.catalog_manifest"
    assert manifest["start_index"] == 0


def test_donkeycar_training_pipeline_reads_our_tub(tmp_path: Path) -> None:
    import_donkeycar_tub()
    from donkeycar.config import Config
    from donkeycar.pipeline.sequence import TubSequence
    from donkeycar.pipeline.types import TubDataset

    with TubWriter(tmp_path / "tub") as writer:
        for i in range(12):
            writer.write(record(i))
    config = Config()
    config.IMAGE_W, config.IMAGE_H, config.IMAGE_DEPTH = 160, 120, 3
    dataset = TubDataset(config, [str(tmp_path / "tub")])
    records = dataset.get_records()
    assert len(records) == 12
    pipeline = TubSequence(records).build_pipeline(
        x_transform=lambda r: r.image() / 255.0,
        y_transform=lambda r: (r.underlying["user/angle"], r.underlying["user/throttle"]),
    )
    batches = list(pipeline)
    assert len(batches) == 12
    x, y = batches[5]
    assert x.shape == (120, 160, 3) and x.min() >= 0.0 and x.max() <= 1.0
    assert y == (pytest.approx(0.05 - 0.5, abs=1e-6), 0.25)
    dataset.close()


def test_reopen_continues_with_a_new_session_and_donkeycar_can_append(tmp_path: Path) -> None:
    Tub = import_donkeycar_tub()
    path = tmp_path / "tub"
    with TubWriter(path, max_catalog_len=4) as writer:
        for i in range(6):
            writer.write(record(i))
    theirs = Tub(str(path))
    theirs.write_record(record(6))
    theirs.close()
    with TubWriter(path, max_catalog_len=4) as writer:
        assert writer.current_index == 7
        assert writer.write(record(7)) == 7
    _, records, _ = read_with_donkeycar(path)
    assert [r["_index"] for r in records] == list(range(8))
    sessions = [r["_session_id"].split("_")[1] for r in records]
    assert sessions == ["0"] * 6 + ["1", "2"]


def test_reopen_with_other_inputs_is_refused(tmp_path: Path) -> None:
    with TubWriter(tmp_path / "tub") as writer:
        writer.write(record(0))
    with pytest.raises(TubFormatError, match="cannot append records with inputs"):
        TubWriter(tmp_path / "tub", inputs=["user/angle"], types=["float"])


def test_bad_values_are_refused_and_change_nothing(tmp_path: Path) -> None:
    import_donkeycar_tub()
    path = tmp_path / "tub"
    with TubWriter(path) as writer:
        writer.write(record(0))
        before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
        for bad in ({"user/angle": float("nan")}, {"user/throttle": "fast"},
                    {"cam/image_array": np.zeros(5, dtype=np.uint8)}):
            with pytest.raises(TubFormatError, match="record key"):
                writer.write({**record(1), **bad})
        assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
        assert writer.write(record(1)) == 1
    assert read_with_donkeycar(path)[0] == 2


def test_an_open_empty_tub_is_readable_and_a_closed_one_leaves_nothing(tmp_path: Path) -> None:
    """While open (or after a crash) an empty tub reads as 0 records; closed empty, nothing is left.

    Nothing is left because DonkeyCar's own writer would hide its records behind the placeholder.
    """
    from agent.cli import tub_info

    path = tmp_path / "tub"
    with TubWriter(path):
        length, records, _ = read_with_donkeycar(path)
        assert (length, records) == (0, [])
        assert tub_info(path)["records"] == 0
    assert not path.exists()


def test_an_empty_tub_left_by_a_crash_is_readable_and_continued(tmp_path: Path) -> None:
    path = tmp_path / "tub"
    writer = TubWriter(path)  # never closed: as if killed before the first record
    assert read_with_donkeycar(path)[:2] == (0, [])
    with TubWriter(path) as again:
        assert again.write(record(0)) == 0
    assert [r["_index"] for r in read_with_donkeycar(path)[1]] == [0]
    writer.close()  # the abandoned writer must not undo the other's record
    assert [r["_index"] for r in read_with_donkeycar(path)[1]] == [0]


def test_donkeycars_own_empty_tub_is_continued_and_never_removed(tmp_path: Path) -> None:
    Tub = import_donkeycar_tub()
    path = tmp_path / "tub"
    Tub(str(path), inputs=list(STANDARD_INPUTS), types=list(STANDARD_TYPES)).close()
    with TubWriter(path):
        pass
    assert (path / "manifest.json").exists() and (path / "catalog_0.catalog").stat().st_size == 0
    with TubWriter(path) as writer:
        writer.write(record(0))
    assert [r["_index"] for r in read_with_donkeycar(path)[1]] == [0]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from agent.tub import TubWriter
    writer = TubWriter(sys.argv[1], max_catalog_len=25, fsync_interval=3600)
    image = np.full((120, 160, 3), 128, dtype=np.uint8)
    i = 0
    while True:
        writer.write({"cam/image_array": image, "user/angle": 0.1, "user/throttle": 0.2, "user/mode": "user"})
        i += 1
        if i == 30:
            print("ready", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.17, 0.31])
def test_a_killed_writer_leaves_a_readable_tub(tmp_path: Path, delay: float) -> None:
    import_donkeycar_tub()
    path = tmp_path / "tub"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    length, records, _ = read_with_donkeycar(path)
    assert len(records) >= 30
    assert len(records) in (length, length + 1)  # at most one line not yet in the manifest
    for catalog in path.glob("*.catalog"):
        assert catalog.stat().st_size > 0
    for r in records:
        with Image.open(path / "images" / r["cam/image_array"]) as image:
            image.load()
    # Our writer continues the tub cleanly where the manifest says it ended.
    with TubWriter(path, max_catalog_len=25) as writer:
        resumed_at = writer.current_index
        writer.write(record(0))
    again = read_with_donkeycar(path)[1]
    assert [r["_index"] for r in again] == list(range(resumed_at + 1))


class SlowWriter(TubWriter):
    def write(self, record):  # type: ignore[override]
        time.sleep(0.01)
        return super().write(record)


def test_recorder_never_blocks_and_counts_drops(tmp_path: Path) -> None:
    import_donkeycar_tub()
    recorder = TubRecorder(SlowWriter(tmp_path / "tub"), capacity=8)
    started = time.perf_counter()
    accepted = [recorder.submit(record(i)) for i in range(200)]
    submit_time = time.perf_counter() - started
    recorder.close()
    assert recorder.dropped == accepted.count(False) > 0
    assert recorder.written == accepted.count(True)
    assert recorder.submitted == 200 == recorder.written + recorder.lost
    assert submit_time < 1.0  # 200 writes would take >= 2 s if submit waited for them
    records = read_with_donkeycar(tmp_path / "tub")[1]
    assert len(records) == recorder.written
    kept = [i for i, ok in enumerate(accepted) if ok]
    angles = [r["user/angle"] for r in records]
    assert angles == pytest.approx([i / 100 - 0.5 for i in kept], abs=1e-6)  # in order


def test_recorder_counts_rejected_records_and_keeps_going(tmp_path: Path) -> None:
    errors: list[str] = []
    recorder = TubRecorder(TubWriter(tmp_path / "tub"), capacity=16)
    recorder.on_error = errors.append
    recorder.submit(record(0))
    recorder.submit({**record(1), "user/angle": float("inf")})
    recorder.submit(record(2))
    recorder.close()
    assert (recorder.written, recorder.rejected) == (2, 1)
    assert errors and "user/angle" in errors[0]


def test_recorded_jpeg_is_what_pillow_writes(tmp_path: Path) -> None:
    with TubWriter(tmp_path / "tub") as writer:
        writer.write(record(3))
    expected = io.BytesIO()
    Image.fromarray(frame(3)).save(expected, format="JPEG")
    assert (tmp_path / "tub" / "images" / "0_cam_image_array_.jpg").read_bytes() == expected.getvalue()
