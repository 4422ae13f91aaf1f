"""Test-time augmentation for the review decision only (issue 14): does a flag that
looks at several views of each image leave more images unflagged at the same accuracy?

    PYTHONPATH=src python benchmarks/review_views.py [--model RUN] [--backend onnx-int8]
        [--targets 0.995,0.997,0.998] [--json out.json]

The model (bundled by default, through ``Classifier`` with the given backend, no
multi-cell screen, no other-labs model) classifies the seed's val and test splits of
../shared/data/pbc in the 4 dihedral views (identity, h-flip, v-flip, 180 degrees).
The answer is always the identity view's class; the review score is

- ``single``: its calibrated top probability (what bloodcell ships),
- ``mean4``: the probability of that class averaged over the 4 views,
- ``min4``: the lowest probability of that class over the 4 views (any view in doubt
  flags the image),

and for each target accuracy on unflagged images the threshold is the lowest that
reaches the target on **val**; the test split only reports the unflagged share and
its accuracy at that threshold. Last, the test split through ``Classifier.predict``
(what `bloodcell predict --review-views 1|4` runs) at the model's own review threshold.
"""
import argparse
from pathlib import Path

import numpy as np

from bloodcell import data as D
from bloodcell.predict import Classifier

VIEWS = (lambda x: x, lambda x: x[:, :, ::-1], lambda x: x[:, ::-1], lambda x: x[:, ::-1, ::-1])


def view_probs(clf: Classifier, files: list[Path], batch: int = 64) -> np.ndarray:
    """[4 views, N, C] calibrated probabilities."""
    out = []
    for i in range(0, len(files), batch):
        x = np.stack([clf.preprocess(f) for f in files[i:i + batch]])
        out.append(np.stack([clf.predict_proba_arrays(np.ascontiguousarray(v(x))) for v in VIEWS]))
    return np.concatenate(out, axis=1)


def scores(p: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    pred = p[0].argmax(1)
    of_pred = p[:, np.arange(p.shape[1]), pred]  # [views, N]
    return pred, {"single": of_pred[0], "mean4": of_pred.mean(0), "min4": of_pred.min(0)}


def threshold_for(score: np.ndarray, right: np.ndarray, target: float) -> float:
    """The lowest threshold whose unflagged images (score >= it) are >= target right."""
    order = np.argsort(-score)
    acc = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(acc >= target)
    return float(score[order][ok.max()]) if len(ok) else float("inf")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="run folder (default: the bundled model)")
    ap.add_argument("--backend", default="onnx-int8")
    ap.add_argument("--data", default=None, help="default: ../shared/data/pbc")
    ap.add_argument("--targets", default="0.995,0.997,0.998")
    ap.add_argument("--json")
    a = ap.parse_args()
    clf = Classifier.load(a.model, backend=a.backend, screen=None, fallback=None)
    root = Path(a.data or D.default_data_dir())
    ds = D.scan(root, classes=clf.classes)
    splits = D.model_splits(ds, clf.meta.train_args)  # re-derived from the model's seed
    res = {}
    for split in ("val", "test"):
        idx = D.split_indices(splits, split)
        p = view_probs(clf, [root / ds.samples[i].path for i in idx])
        pred, sc = scores(p)
        res[split] = (pred == ds.labels[idx], sc)
        print(f"{split}: {len(idx)} images, accuracy {res[split][0].mean():.4f} "
              f"(mean of 4 views: {(p.mean(0).argmax(1) == ds.labels[idx]).mean():.4f})", flush=True)
    table = []
    print("| score | target (val) | threshold | val unflagged | test unflagged | test right of unflagged "
          "| test errors unflagged |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("single", "mean4", "min4"):
        for target in map(float, a.targets.split(",")):
            (rv, sv), (rt, st) = [(res[k][0], res[k][1][name]) for k in ("val", "test")]
            thr = threshold_for(sv, rv, target)
            keep = st >= thr
            row = {"score": name, "target": target, "threshold": thr, "val_unflagged": float((sv >= thr).mean()),
                   "test_unflagged": float(keep.mean()), "test_right": float(rt[keep].mean()),
                   "test_errors": int((~rt[keep]).sum())}
            table.append(row)
            print(f"| {name} | {target} | {thr:.4f} | {row['val_unflagged']:.3f} | {row['test_unflagged']:.3f} | "
                  f"{row['test_right']:.4f} | {row['test_errors']} |")
    shipped = as_predicted(a, root, ds, splits)
    if a.json:
        D.atomic_write_json(Path(a.json), {"model": a.model or "bundled", "backend": a.backend, "rows": table,
                                           "predict_test": shipped})


def as_predicted(a, root: Path, ds, splits) -> dict:
    """The test split through ``Classifier.predict`` (the path of `bloodcell predict`, with its
    input checks; no screen, no other-labs model) at the model's own review threshold, with
    ``review_views`` 1 and 4."""
    idx = D.split_indices(splits, "test")
    files, y = [root / ds.samples[i].path for i in idx], ds.labels[idx]
    out = {}
    print("| through Classifier.predict | review threshold | flagged | right of the unflagged | errors unflagged |")
    print("|---|---:|---:|---:|---:|")
    for views in (1, 4):
        clf = Classifier.load(a.model, backend=a.backend, screen=None, fallback=None, review_views=views)
        recs = clf.predict(files)
        right = np.array([clf.classes.index(r["class"]) == t for r, t in zip(recs, y)])
        keep = ~np.array([r["needs_review"] for r in recs])
        out[views] = {"flagged": float(1 - keep.mean()), "right_unflagged": float(right[keep].mean()),
                      "errors_unflagged": int((~right[keep]).sum()), "accuracy": float(right.mean())}
        print(f"| review_views={views} | {clf.review_threshold:.4f} | {1 - keep.mean():.3f} | "
              f"{right[keep].mean():.4f} | {int((~right[keep]).sum())} |", flush=True)
    return out


if __name__ == "__main__":
    main()
