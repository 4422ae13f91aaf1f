"""How the classifier reads a cell shown smaller in the frame (another magnification
or a wider crop): each image is padded with its own background colour to k times
its size, so the cell covers 1/k of the width, then classified.

    .venv/bin/python benchmarks/zoom_out.py [--per-class 10] [--factors 1,2,3]

Prints, per factor, the accuracy, how many wrong answers were NOT flagged (neither
needs_review nor input_warnings) and what the wrong answers were. Factor 1 is the
unchanged image, for reference. Images are the first N files of each white-cell
class folder (any split: this measures a failure mode, not the test accuracy).
"""
import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell import Classifier
from bloodcell.data import default_data_dir

WHITE_CELLS = ["basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil"]


def zoom_out(a: np.ndarray, k: int) -> np.ndarray:
    """Pad with the median border colour to k x the size, the image in the centre."""
    if k == 1:
        return a
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    out = np.tile(np.median(border, axis=0).astype(np.uint8), (h * k, w * k, 1))
    y, x = (h * k - h) // 2, (w * k - w) // 2
    out[y:y + h, x:x + w] = a
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="default: ../shared/data/pbc")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--factors", default="1,2,3")
    ap.add_argument("--model", default=None, help="default: the bundled model")
    a = ap.parse_args()
    root = Path(a.data or default_data_dir())
    clf = Classifier.load(a.model)
    files = [(c, p) for c in WHITE_CELLS
             for p in sorted(q for q in (root / c).glob("*.jpg") if not q.name.startswith("."))[:a.per_class]]
    images = [(c, np.asarray(Image.open(p).convert("RGB"))) for c, p in files]
    print(f"{len(images)} images ({a.per_class} per white-cell class) from {root}")
    print("| zoom-out | accuracy | wrong | wrong and not flagged | wrong answers |")
    print("|---:|---:|---:|---:|---|")
    for k in (int(f) for f in a.factors.split(",")):
        recs = clf.predict([zoom_out(im, k) for _, im in images])
        wrong = [(c, r) for (c, _), r in zip(images, recs) if r["class"] != c]
        silent = sum(1 for _, r in wrong if not (r["needs_review"] or r.get("input_warnings")))
        what = ", ".join(f"{n} {cls}" for cls, n in Counter(r["class"] for _, r in wrong).most_common())
        print(f"| {k}x | {1 - len(wrong) / len(images):.2f} | {len(wrong)} | {silent} | {what or '-'} |")


if __name__ == "__main__":
    main()
