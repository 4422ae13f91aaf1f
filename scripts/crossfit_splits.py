"""Cross-fitting splits for honest teacher predictions on the training images.

From a split manifest, write two: in ``fold-a.csv`` a stratified half of the
training images (half B) is marked ``test``, in ``fold-b.csv`` the other half (A).
A teacher trained on fold-a's train rows and run with ``bloodcell evaluate
--split test`` answers for half B on images it never trained on, and the other
way round; together the two predictions.csv files cover every training image
for ``bloodcell train --distill fold-a/predictions.csv,fold-b/predictions.csv``.
Validation rows stay validation rows; test rows of the original manifest are
dropped (a teacher must never see them), so the folds fit a copy of the data
without its test images, such as the pack of benchmarks/pack_for_device.py (a
manifest must name every file of the folder it is used with):

    python scripts/crossfit_splits.py .gpu/p14/split.csv --out .gpu/p14
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def halves(rows: list[dict], seed: int) -> np.ndarray:
    """A boolean per training row: True for half A, stratified by class folder."""
    rng = np.random.default_rng(seed)
    classes = np.array([Path(r["path"]).parts[0] for r in rows])
    in_a = np.zeros(len(rows), dtype=bool)
    for c in np.unique(classes):
        idx = rng.permutation(np.flatnonzero(classes == c))
        in_a[idx[: len(idx) // 2]] = True
    return in_a


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with open(args.split, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] != "test"]
    train = [r for r in rows if r["split"] == "train"]
    in_a = dict(zip((r["path"] for r in train), halves(train, args.seed)))
    n_a = sum(in_a.values())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, held_out_a in (("fold-a.csv", False), ("fold-b.csv", True)):
        out = Path(args.out) / name
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                held = r["split"] == "train" and in_a[r["path"]] == held_out_a
                w.writerow({**r, "split": "test" if held else r["split"]})
        n_held = n_a if held_out_a else len(train) - n_a
        print(f"{out}: {len(train) - n_held} train, {n_held} held out as test")


if __name__ == "__main__":
    main()
