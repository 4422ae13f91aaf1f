"""The split manifest of a *final* model: once a recipe and its epoch count are fixed on
the validation split, the shipped model trains on more data. A stratified share of the
val rows moves to train; the rest of val stays as the calibration part (temperature and
review threshold need images the model never trained on); test is untouched.

    python scripts/final_split.py runs/recipe-s42/split.csv --to-train 0.5 --out runs/final-split.csv
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bloodcell.data import atomic_write_bytes  # noqa: E402


def final_rows(rows: list[dict], to_train: float, seed: int) -> list[dict]:
    """Copy of ``rows`` with ``to_train`` of each class's val rows relabelled train."""
    if not 0 < to_train < 1:
        raise ValueError(f"--to-train must be between 0 and 1 (exclusive), got {to_train}")
    rng = np.random.default_rng(seed)
    out = [dict(r) for r in rows]
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(out):
        if r["split"] == "val":
            by_class.setdefault(r["class"], []).append(i)
    for cls in sorted(by_class):
        idx = sorted(by_class[cls], key=lambda i: out[i]["path"])  # order-independent draw
        for i in rng.permutation(idx)[: round(to_train * len(idx))]:
            out[i]["split"] = "train"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", help="the split.csv the recipe was chosen on")
    ap.add_argument("--to-train", type=float, default=0.5, help="share of val moved to train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    with open(a.split, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if not rows or "split" not in (fields or []):
        sys.exit(f"{a.split}: not a split manifest (need a split column)")
    rows = final_rows(rows, a.to_train, a.seed)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(Path(a.out), buf.getvalue().encode())
    print(a.out, dict(Counter(r["split"] for r in rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
