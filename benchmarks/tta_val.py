"""Test-time augmentation on the validation split: does averaging the softmax over
flipped/rotated views help a saved model?

    BLOODCELL_CACHE=... .venv/bin/python benchmarks/tta_val.py [RUN_DIR] [--data DIR]

Prints the val accuracy of each of the 8 dihedral views alone, then of the mean
over 4 views (identity, h-flip, v-flip, 180 deg) and over all 8.
"""
import argparse

import numpy as np
import torch

from bloodcell import data as D
from bloodcell.models import load_model
from bloodcell.transforms import to_tensor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", default="runs/recipe-s42")
    ap.add_argument("--data", default=str(D.default_data_dir() or "../shared/data/pbc"))
    a = ap.parse_args()
    model, meta = load_model(a.run)
    ds = D.scan(a.data, classes=meta["classes"])
    images, _ = D.load_images(ds, meta["image_size"], progress=False)
    splits = D.apply_manifest(ds, D.read_manifest(f"{a.run}/split.csv"))
    va = D.split_indices(splits, "val")
    x, y = np.asarray(images[va]), ds.labels[va]
    views = {"identity": x, "h-flip": x[:, :, ::-1], "v-flip": x[:, ::-1], "rot180": x[:, ::-1, ::-1],
             "rot90": np.rot90(x, 1, (1, 2)), "rot270": np.rot90(x, 3, (1, 2)),
             "transpose": x.transpose(0, 2, 1, 3), "anti-transpose": x[:, ::-1, ::-1].transpose(0, 2, 1, 3)}
    probs = {}
    with torch.inference_mode():
        for name, v in views.items():
            p = np.concatenate([torch.softmax(model(to_tensor(np.ascontiguousarray(v[i:i + 128]))), 1).numpy()
                                for i in range(0, len(v), 128)])
            probs[name] = p
            print(f"{name:<15} val accuracy {(p.argmax(1) == y).mean():.4f}", flush=True)
    for keys in (list(views)[:4], list(views)):
        p = np.mean([probs[k] for k in keys], axis=0)
        print(f"mean of {len(keys)} views  val accuracy {(p.argmax(1) == y).mean():.4f}")


if __name__ == "__main__":
    main()
