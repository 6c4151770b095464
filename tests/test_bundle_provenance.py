"""Provenance from a training run: tub digests and models/train.py's manifest, accepted by `model pack`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.bundle.errors import ManifestError
from agent.bundle.manifest import Provenance
from agent.bundle.provenance import from_training, main, tub_digest
from agent.tub import TubWriter
from tests.bundles import ROOT

TRAIN_MANIFEST = json.loads((ROOT / "models" / "manifest.json").read_text())


def write_tub(path: Path, records: int) -> Path:
    with TubWriter(path) as writer:
        for index in range(records):
            writer.write({"cam/image_array": np.full((120, 160, 3), index * 10, np.uint8), "user/angle": 0.1 * index,
                          "user/throttle": 0.2, "user/mode": "user"})
    return path


def test_a_tub_digest_pins_the_data(tmp_path: Path) -> None:
    tub = write_tub(tmp_path / "tub_a", 4)
    digest = tub_digest(tub)
    assert (digest.name, digest.records) == ("tub_a", 4)
    copy = shutil.copytree(tub, tmp_path / "elsewhere" / "tub_a")
    assert tub_digest(copy).sha256 == digest.sha256  # the same data digests the same anywhere
    image = next((copy / "images").iterdir())
    image.write_bytes(image.read_bytes()[:-1] + b"\0")
    assert tub_digest(copy).sha256 != digest.sha256  # one changed byte in one image changes it
    with pytest.raises(ManifestError, match="not a tub"):
        tub_digest(tmp_path)


def test_provenance_from_the_shipped_training_run(tmp_path: Path) -> None:
    provenance = from_training(TRAIN_MANIFEST, [write_tub(tmp_path / "tub_generated_track_11", 3)],
                               "python models/train.py")
    assert provenance.donkeycar_version == "5.3.0" and provenance.training_command == "python models/train.py"
    tracks = {evaluation.track: evaluation for evaluation in provenance.twin_evaluation}
    assert set(tracks) == {"generated_track", "mountain_track"}
    assert tracks["mountain_track"].max_abs_cte == TRAIN_MANIFEST["evaluation_in_twin"]["mountain_track"]["max_abs_cte"]
    assert provenance.training_data[0].records == 3


def test_the_command_output_is_what_pack_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tub = write_tub(tmp_path / "tub_x", 2)
    assert main(["--train-manifest", str(ROOT / "models" / "manifest.json"), str(tub)]) == 0
    provenance = Provenance.model_validate_json(capsys.readouterr().out)
    assert provenance.training_data[0].name == "tub_x" and provenance.training_command is not None
    assert main(["--train-manifest", str(tmp_path / "missing.json")]) == 1
