"""Test-time augmentation and two-model cascades on the validation split: does
averaging the softmax over flipped/rotated views, or over a second model, help?

    BLOODCELL_CACHE=... .venv/bin/python benchmarks/tta_val.py [RUN_DIR] [--second RUN_DIR]
    ... tta_val.py RUN_DIR --ensemble RUN_DIR [RUN_DIR ...]   # n-model average, 1 view

Prints the val accuracy of each of the 8 dihedral views alone, the mean over 4
views (identity, h-flip, v-flip, 180 deg) and over all 8, and the *selective*
variants that spend the extra views (or the second model) only on the images the
first model is unsure of (top probability below a cut-off), with the share of
images that pay the extra cost. Probabilities are cached next to each run
(val_views.npz), so a re-run with another --second is quick.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from bloodcell import data as D
from bloodcell.modelfile import ModelFile
from bloodcell.models import load_model
from bloodcell.transforms import to_tensor

VIEWS = ["identity", "h-flip", "v-flip", "rot180", "rot90", "rot270", "transpose", "anti-transpose"]


def dihedral(x: np.ndarray, name: str) -> np.ndarray:
    return {"identity": x, "h-flip": x[:, :, ::-1], "v-flip": x[:, ::-1], "rot180": x[:, ::-1, ::-1],
            "rot90": np.rot90(x, 1, (1, 2)), "rot270": np.rot90(x, 3, (1, 2)),
            "transpose": x.transpose(0, 2, 1, 3),
            "anti-transpose": x[:, ::-1, ::-1].transpose(0, 2, 1, 3)}[name]


def val_view_probs(run: str, data: str, n_views: int = 8):
    """(probabilities per view [n_views, N, C], labels [N], split manifest sha1) on val."""
    cache = Path(run) / "val_views.npz"
    sha = D.manifest_sha1(Path(run) / "split.csv")
    if cache.exists():
        z = np.load(cache)
        if str(z["split_sha1"]) == sha and len(z["probs"]) >= n_views:
            return z["probs"][:n_views], z["labels"], sha
    model, meta = load_model(run)
    ds = D.scan(data, classes=meta.classes)
    images, _ = D.load_images(ds, meta.image_size, progress=False)
    splits = D.apply_manifest(ds, D.read_manifest(Path(run) / "split.csv"))
    va = D.split_indices(splits, "val")
    x, y = np.asarray(images[va]), ds.labels[va]
    out = []
    with torch.inference_mode():
        for name in VIEWS[:n_views]:
            v = dihedral(x, name)
            out.append(np.concatenate([torch.softmax(model(to_tensor(np.ascontiguousarray(v[i:i + 128]))), 1)
                                       .numpy() for i in range(0, len(v), 128)]))
            print(f"  {run}: {name} done", flush=True)
    probs = np.stack(out)
    np.savez(cache, probs=probs, labels=y, split_sha1=sha)
    return probs, y, sha


def other_run_probs(run: str, ref: str, data: str, sha: str, y: np.ndarray, n_views: int):
    """val_view_probs of another run, refusing one trained on another split than ``ref``."""
    p, y2, sha2 = val_view_probs(run, data, n_views)
    if sha2 != sha or not np.array_equal(y, y2):
        raise SystemExit(f"{run} was trained on another split than {ref}")
    return p


def errors_by_subtype(run: str, data: str, probs: np.ndarray, y: np.ndarray) -> str:
    """Wrong answers per file-name sub-type (PBC: BNE/SNE neutrophils, PMY/MY/MMY ig)."""
    classes = ModelFile.load(run).classes  # no weights needed
    ds = D.scan(data, classes=classes)
    splits = D.apply_manifest(ds, D.read_manifest(Path(run) / "split.csv"))
    names, sub = D.subclass_labels(ds)
    sub = sub[D.split_indices(splits, "val")]
    wrong = probs.argmax(1) != y
    return ", ".join(f"{names[g]} {int(wrong[sub == g].sum())}" for g in np.unique(sub)
                     if wrong[sub == g].any())


def selective(base: np.ndarray, better: np.ndarray, y: np.ndarray, cut: float):
    """Use `better` where the base's top probability is below `cut`."""
    unsure = base.max(1) < cut
    p = np.where(unsure[:, None], better, base)
    return (p.argmax(1) == y).mean(), unsure.mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", default="runs/recipe-s42")
    ap.add_argument("--second", help="a second run (same split) for ensembles and cascades")
    ap.add_argument("--ensemble", nargs="+", metavar="RUN",
                    help="more runs (same split): each alone and the mean of all, one view each")
    ap.add_argument("--data", default=str(D.default_data_dir() or "../shared/data/pbc"))
    ap.add_argument("--cuts", default="0.6,0.7,0.8,0.9,0.95")
    ap.add_argument("--second-views", type=int, default=8, choices=[1, 4, 8],
                    help="dihedral views to compute for the second model (1 = plain ensemble only)")
    a = ap.parse_args()
    cuts = [float(c) for c in a.cuts.split(",")]
    acc = lambda p: (p.argmax(1) == y).mean()  # noqa: E731
    if a.ensemble:
        probs, y, sha = val_view_probs(a.run, a.data, 1)
        members = [probs[0]]
        members += [other_run_probs(run, a.run, a.data, sha, y, 1)[0] for run in a.ensemble]
        for run, p in zip([a.run, *a.ensemble], members):
            print(f"{run}: val accuracy {acc(p):.4f} ({int((p.argmax(1) != y).sum())} wrong)")
        m = np.mean(members, 0)
        print(f"mean of {len(members)} models: val accuracy {acc(m):.4f} "
              f"({int((m.argmax(1) != y).sum())} wrong of {len(y)})")
        print(f"errors by sub-type: {errors_by_subtype(a.run, a.data, m, y)}")
        return
    probs, y, sha = val_view_probs(a.run, a.data)
    for name, p in zip(VIEWS, probs):
        print(f"{name:<15} val accuracy {acc(p):.4f}")
    base, tta4, tta8 = probs[0], probs[:4].mean(0), probs.mean(0)
    print(f"errors by sub-type: {errors_by_subtype(a.run, a.data, base, y)}")
    print(f"mean of 4 views  val accuracy {acc(tta4):.4f}\nmean of 8 views  val accuracy {acc(tta8):.4f}")
    print("\nselective TTA (extra views only below the cut-off; raw softmax of the first model)")
    print("cut-off  share re-run  acc 4 views  acc 8 views")
    for c in cuts:
        a4, share = selective(base, tta4, y, c)
        a8, _ = selective(base, tta8, y, c)
        print(f"{c:7.2f}  {share:12.3f}  {a4:11.4f}  {a8:11.4f}")
    if a.second:
        p2 = other_run_probs(a.second, a.run, a.data, sha, y, a.second_views)
        ks = [k for k in (1, 4, 8) if k <= len(p2)]
        print(f"\nsecond model {a.second}: alone {acc(p2[0]):.4f}, {len(p2)} view(s) {acc(p2.mean(0)):.4f}")
        print(f"errors by sub-type: {errors_by_subtype(a.second, a.data, p2[0], y)}")
        print(f"ensemble (mean of both, 1 view each) {acc((base + p2[0]) / 2):.4f}; "
              f"both with {len(p2)} view(s) {acc((probs[:len(p2)].mean(0) + p2.mean(0)) / 2):.4f}")
        print(f"cascade: the first model, then both ({' / '.join(map(str, ks))} view(s) each) below the cut-off")
        print("cut-off  share re-run" + "".join(f"  acc {k} view(s)" for k in ks))
        for c in cuts:
            r = [selective(base, (probs[:k].mean(0) + p2[:k].mean(0)) / 2, y, c) for k in ks]
            print(f"{c:7.2f}  {r[0][1]:12.3f}" + "".join(f"  {x[0]:14.4f}" for x in r))


if __name__ == "__main__":
    main()
