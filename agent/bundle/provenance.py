"""A bundle's provenance from a training run: digests of the training tubs and what the trainer recorded.

``./dev.sh train-model`` runs ``models/train.py`` (DonkeyCar's trainer on twin data), then this module
turns its ``models/manifest.json`` and the tubs it trained on into the ``provenance`` of a bundle:

    python -m agent.bundle.provenance --train-manifest models/manifest.json build/train/tub_* > provenance.json
    donkey-agent model pack out/pilot --model models/pilot.tflite ... --provenance provenance.json

A tub's digest is the sha256 of its file list (relative path and sha256 of each file, sorted), so the
same data gives the same digest on any machine and a changed record changes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.bundle.errors import ManifestError
from agent.bundle.manifest import DataDigest, Provenance, TwinEvaluation


def tub_digest(tub: Path) -> DataDigest:
    """Pin a DonkeyCar tub: a digest over every file in it, and its record count."""
    from agent.cli import tub_info

    if not (tub / "manifest.json").is_file():
        raise ManifestError(f"{tub}: not a tub (no manifest.json)")
    listing = hashlib.sha256()
    for path in sorted(p for p in tub.rglob("*") if p.is_file() and not p.is_symlink()):
        file_digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                file_digest.update(chunk)
        listing.update(f"{path.relative_to(tub).as_posix()}\0{file_digest.hexdigest()}\n".encode())
    try:
        records = int(tub_info(tub)["records"])  # type: ignore[call-overload]
    except (OSError, ValueError, KeyError) as exc:
        raise ManifestError(f"{tub}: not a readable tub ({exc})") from None
    return DataDigest(name=tub.name, sha256=listing.hexdigest(), records=records)


def from_training(train_manifest: dict[str, Any], tubs: Sequence[Path], command: str | None = None) -> Provenance:
    """Provenance from ``models/train.py``'s manifest (its ``training`` and ``evaluation_in_twin``) and the tubs."""
    trainer = str(train_manifest.get("training", {}).get("trainer", ""))
    match = re.search(r"donkeycar (\S+)", trainer)
    evaluations = [
        TwinEvaluation(track=track, laps=int(result["laps"]), off_track_events=int(result["off_track_events"]),
                       mean_abs_cte=float(result["mean_abs_cte"]), max_abs_cte=float(result["max_abs_cte"]))
        for track, result in sorted(train_manifest.get("evaluation_in_twin", {}).items())
    ]
    return Provenance(training_data=[tub_digest(tub) for tub in tubs],
                      training_command=command or train_manifest.get("made_with") or None,
                      donkeycar_version=match.group(1) if match else None, twin_evaluation=evaluations)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.bundle.provenance",
                                     description="Print a bundle's provenance JSON for `model pack --provenance`.")
    parser.add_argument("tubs", type=Path, nargs="*", help="the tubs the model was trained on")
    parser.add_argument("--train-manifest", type=Path, required=True, help="models/manifest.json of models/train.py")
    parser.add_argument("--command", help="the training command (default: the manifest's made_with)")
    args = parser.parse_args(argv)
    try:
        train_manifest = json.loads(args.train_manifest.read_text(encoding="utf-8"))
        provenance = from_training(train_manifest, args.tubs, args.command)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # ManifestError and pydantic's errors are ValueErrors
        print(f"provenance: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(provenance.model_dump(mode="json"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
