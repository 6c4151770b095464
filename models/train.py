"""Make the shipped autopilot: expert data from the twin, DonkeyCar's own trainer, then a closed-loop check.

Needs the `train` extra (TensorFlow 2.15 and donkeycar 5.3.0 on Python 3.11):

    pip install -e .[train]
    python models/train.py            # or: ./dev.sh train-model

Writes models/pilot.tflite and models/manifest.json (sha256, kind, input size, data, training,
and how the model drives both twin tracks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import random
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from simulator.evaluate import drive_model
from simulator.record import record_in_process
from simulator.render import Randomization

HERE = Path(__file__).parent

# (track, laps, steering noise, mean seconds between recovery manoeuvres, randomisation, seed)
DATASETS = [
    ("generated_track", 6, 0.08, 3.0, 0.3, 11),
    ("generated_track", 4, 0.0, 0.0, 0.0, 12),
    ("generated_track", 4, 0.15, 2.0, 0.6, 13),
    ("mountain_track", 6, 0.08, 3.0, 0.3, 14),
]


def record_data(work: Path) -> list[Path]:
    tubs = []
    for track, laps, noise, recovery, randomize, seed in DATASETS:
        path = work / f"tub_{track}_{seed}"
        if path.exists():
            shutil.rmtree(path)
        randomization = Randomization(lighting=0.3 * randomize, texture=randomize, noise=6.0 * randomize)
        result = record_in_process(path, track=track, laps=laps, noise=noise, recovery_interval=recovery,
                                   seed=seed, randomization=randomization)
        logging.info("recorded %s: %d records, %d off-track", path.name, result.records,
                     result.stats["off_track_events"])
        tubs.append(path)
    return tubs


def train(tubs: list[Path], work: Path, epochs: int, seed: int) -> dict[str, object]:
    import donkeycar
    import tensorflow as tf
    from donkeycar.config import Config
    from donkeycar.pipeline.training import train as donkey_train

    random.seed(seed)
    np.random.seed(seed)
    tf.keras.utils.set_random_seed(seed)
    cfg = Config()
    cfg.from_pyfile(str(Path(donkeycar.__file__).parent / "templates" / "cfg_complete.py"))
    cfg.MODELS_PATH = str(work)
    cfg.BATCH_SIZE = 64
    cfg.MAX_EPOCHS = epochs
    cfg.EARLY_STOP_PATIENCE = 3
    cfg.TRAIN_TEST_SPLIT = 0.85
    cfg.SHOW_PLOT = False
    cfg.VERBOSE_TRAIN = 2
    cfg.PRINT_MODEL_SUMMARY = False
    cfg.CREATE_TF_LITE = True
    started = time.time()
    history = donkey_train(cfg, ",".join(str(t) for t in tubs), model=str(work / "pilot.h5"), model_type="linear")
    return {
        "trainer": f"donkeycar {version('donkeycar')} pipeline.training.train, model_type linear",
        "tensorflow": tf.__version__,
        "epochs_run": len(history["loss"]),
        "final_loss": round(float(history["loss"][-1]), 5),
        "best_val_loss": round(float(min(history["val_loss"])), 5),
        "batch_size": cfg.BATCH_SIZE,
        "seconds": round(time.time() - started, 1),
        "seed": seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/train"))
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)

    tubs = record_data(args.work)
    training = train(tubs, args.work, args.epochs, args.seed)
    model = args.out / "pilot.tflite"
    shutil.copyfile(args.work / "pilot.tflite", model)

    evaluations = {}
    for track in ("generated_track", "mountain_track"):
        result = drive_model(model, track, laps=3)
        evaluations[track] = {"laps": result.laps, "consecutive_clean_laps": result.consecutive_clean_laps,
                              **{k: result.stats[k] for k in ("lap_times", "off_track_events", "max_abs_cte",
                                                              "mean_abs_cte")}}
        logging.info("%s: %s", track, evaluations[track])

    manifest = {
        "name": "pilot",
        "file": model.name,
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "bytes": model.stat().st_size,
        "kind": "linear",
        "input": {"name": "img_in", "shape": [1, 120, 160, 3], "dtype": "float32", "normalisation": "x / 255"},
        "outputs": ["n_outputs0 (angle)", "n_outputs1 (throttle)"],
        "data": [{"track": t, "laps": laps, "noise": noise, "recovery_interval_s": rec, "randomize": rnd, "seed": s}
                 for t, laps, noise, rec, rnd, s in DATASETS],
        "training": training,
        "evaluation_in_twin": evaluations,
        "made_with": f"models/train.py on {platform.machine()}, Python {platform.python_version()}",
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(evaluations, indent=2))


if __name__ == "__main__":
    main()
