"""Synthetic lab shift on PBC: how a model reads the same cells re-stained, blurred,
rescaled, recompressed or at low resolution (what changes between labs).

    .venv/bin/python benchmarks/shift_eval.py --model runs/robust-s42 [--model bundled] \
        [--split val] [--per-class 40] [--seed 0] [--json out.json]

The cells are the first ``--per-class`` images per class (sorted by file name) of the
seed-42 ``--split`` (val by default: test images stay untouched) of ../shared/data/pbc.
Each shift is applied to the ORIGINAL image (before any preprocessing), with fixed
parameters, then the image goes through ``Classifier.predict`` -- the model's own
preprocessing (framing included), as `bloodcell predict` would see a file of another lab:

- ``none``: unchanged;  ``stain-pale`` / ``stain-dark`` / ``stain-blue`` / ``stain-yellow``:
  optical density scaled per channel (weaker, stronger, bluish, yellow background);
- ``blur``: Gaussian blur sigma 2 px of the 360 px image (out of focus);
- ``jpeg-20``: JPEG quality 20;  ``lowres-100``: down to 100 px and back;
- ``zoom-in-1.6``: central crop of 1/1.6 of the side (cell fills more of the frame, like
  the CellaVision-blog images);  ``zoom-out-2``: padded with background to 2x the side
  (cell half as large, like a lower magnification);  ``crop-tight``: central crop of 0.45
  of the side (the cell fills the frame).
Prints 8-way accuracy per shift and model; ``mean-shifted`` averages all shifts but none;
for a model with an other-labs model (``bundled``), how many images it answered.
``--split test --per-class 100000 --shifts none``: the whole test split as predict reads it.
"""
import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from bloodcell import Classifier
from bloodcell import data as D
from bloodcell.data import default_data_dir
from bloodcell.modelfile import ModelFile


def _od_scale(a, gains, shift=(0, 0, 0)):
    od = -np.log((a.astype(np.float32) + 1) / 256)
    od = od * np.asarray(gains, np.float32) + np.asarray(shift, np.float32)
    return np.clip(np.exp(-od) * 256 - 1, 0, 255).astype(np.uint8)


def _background(a):
    return tuple(int(v) for v in np.percentile(a.reshape(-1, 3), 99, axis=0))


def _centre_crop(im, frac):
    w, h = im.size
    s = int(min(w, h) * frac)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def _pad(im, k):
    w, h = im.size
    out = Image.new("RGB", (int(w * k), int(h * k)), _background(np.asarray(im)))
    out.paste(im, ((out.width - w) // 2, (out.height - h) // 2))
    return out


def _jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


SHIFTS = {
    "none": lambda im: im,
    "stain-pale": lambda im: Image.fromarray(_od_scale(np.asarray(im), (0.6, 0.6, 0.6))),
    "stain-dark": lambda im: Image.fromarray(_od_scale(np.asarray(im), (1.5, 1.5, 1.5))),
    "stain-blue": lambda im: Image.fromarray(_od_scale(np.asarray(im), (1.35, 1.0, 0.7))),
    "stain-yellow": lambda im: Image.fromarray(_od_scale(np.asarray(im), (0.9, 1.0, 1.3), (0, 0.02, 0.12))),
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "jpeg-20": lambda im: _jpeg(im, 20),
    "lowres-100": lambda im: im.resize((100, 100), Image.BILINEAR).resize(im.size, Image.BILINEAR),
    "zoom-in-1.6": lambda im: _centre_crop(im, 1 / 1.6),
    "zoom-out-2": lambda im: _pad(im, 2),
    "crop-tight": lambda im: _centre_crop(im, 0.45),
}


def pick_cells(root: Path, split: str, per_class: int, meta: ModelFile):
    ds = D.scan(root, classes=meta.classes)
    splits = D.model_splits(ds, meta.train_args)  # re-derived from the model's seed
    by_class: dict[str, list] = {}
    for i in D.split_indices(splits, split):
        s = ds.samples[i]
        by_class.setdefault(ds.classes[s.label], []).append(root / s.path)
    return [(c, p) for c in sorted(by_class) for p in sorted(by_class[c])[:per_class]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append",
                    help="run folder, 'bundled' (with the bundled other-labs model for the images its "
                         "input check routes to it, as `bloodcell predict`), or 'bundled-alone' (repeatable)")
    ap.add_argument("--data", default=None, help="default: ../shared/data/pbc")
    ap.add_argument("--split", default="val")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--shifts", default=",".join(SHIFTS))
    ap.add_argument("--json", help="write the table here as JSON")
    a = ap.parse_args()
    root = Path(a.data or default_data_dir())
    models = a.model or ["bundled"]
    clfs = {m: Classifier.load(None if m.startswith("bundled") else m, backend="onnx", screen=None,
                               **({"fallback": None} if m == "bundled-alone" else {})) for m in models}
    cells = pick_cells(root, a.split, a.per_class, next(iter(clfs.values())).meta)
    originals = [(c, Image.open(p).convert("RGB")) for c, p in cells]
    print(f"{len(cells)} {a.split}-split images of {root} ({a.per_class} per class, seed-42 split)")
    table, routed = {}, {name: {} for name in a.shifts.split(",")}
    print("| shift | " + " | ".join(models) + " |")
    print("|---|" + "---:|" * len(models))
    for name in a.shifts.split(","):
        shifted = [np.asarray(SHIFTS[name](im)) for _, im in originals]
        row, cell = {}, {}
        for m, clf in clfs.items():
            recs = clf.predict(shifted)
            row[m] = float(np.mean([r["class"] == c for (c, _), r in zip(originals, recs)]))
            cell[m] = f"{row[m]:.3f}"
            if clf.fallback is not None:  # how many the other-labs model answered
                routed[name][m] = sum(r.get("model") == "other-labs" for r in recs)
                cell[m] += f" ({routed[name][m]} routed)"
        table[name] = row
        print(f"| {name} | " + " | ".join(cell[m] for m in models) + " |", flush=True)
    if any(s != "none" for s in table):
        mean = {m: float(np.mean([table[s][m] for s in table if s != "none"])) for m in models}
        table["mean-shifted"] = mean
        print("| **mean-shifted** | " + " | ".join(f"**{mean[m]:.3f}**" for m in models) + " |")
    if a.json:
        D.atomic_write_json(Path(a.json), {"split": a.split, "per_class": a.per_class,
                                           "n_images": len(cells), "accuracy": table,
                                           "routed_to_other_labs": routed})


if __name__ == "__main__":
    main()
