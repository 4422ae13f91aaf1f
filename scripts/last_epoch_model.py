"""A run's *last* epoch as a model folder of its own. Training saves the epoch with the
best validation accuracy; a final model trained on train + most of val has only a small
calibration part left for that choice, so its epoch count is fixed in advance (the
recipe's) and the last epoch is the model.

    python scripts/last_epoch_model.py runs/final-lite0-s42 runs/final-lite0-s42-last

Then `bloodcell calibrate --model OUT` and `bloodcell evaluate --model OUT --split test`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file, save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bloodcell.data import atomic_write_bytes  # noqa: E402
from bloodcell.modelfile import ModelFile  # noqa: E402

# fitted on the best epoch's weights: stale for the last epoch's, refitted by calibrate
STALE = {"temperature": 1.0, "review_threshold": None, "calibration": None, "input_check": None,
         "metrics": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished training run (model.json + checkpoint/last.*)")
    ap.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    ckpt = a.run / "checkpoint" / "last.safetensors"
    for f in (a.run / "model.json", a.run / "model.safetensors", ckpt):
        if not f.exists():
            sys.exit(f"{f}: missing (need a training run with its last checkpoint)")
    names = load_file(str(a.run / "model.safetensors")).keys()
    state = load_file(str(ckpt))
    weights = {k: state[f"model.{k}"].contiguous() for k in names if f"model.{k}" in state}
    if len(weights) != len(names):
        sys.exit(f"{ckpt}: does not hold every weight of {a.run / 'model.safetensors'}")
    meta = ModelFile.load(a.run / "model.json")
    if not meta.finished or not meta.history:
        sys.exit(f"{a.run}: the run has not finished; its last checkpoint is not the last epoch")
    last = meta.history[-1]
    meta = replace(meta, **STALE, best={
        "val_accuracy": last["val_accuracy"], "epoch": last["epoch"],
        "chosen": "last epoch (epoch count fixed in advance), not the best on val"})
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(a.out / "model.safetensors", save(weights))
    meta.save(a.out / "model.json")
    shutil.copy(a.run / "split.csv", a.out / "split.csv")
    print(f"{a.out}: epoch {last['epoch']} of {a.run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
