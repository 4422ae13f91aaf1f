"""Measure the multi-cell screen: check-set precision/recall + PR curve, the share
of test-split images flagged per class, and (with --classifier) the classifier's
accuracy on screened-in vs screened-out test images.

    BLOODCELL_CACHE=/work/cache .venv/bin/python benchmarks/screen_eval.py \
        [--screen src/bloodcell/bundled/screen.json] [--classifier runs/recipe-s42]

Prints the figures and writes docs/screen/results.json + docs/screen/pr_curve.png
(no dataset images). Images come through the shared decoded-image cache, i.e.
exactly ``transforms.preprocess(path, screen.image_size)``.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bloodcell import data  # noqa: E402
from bloodcell.screen import FEATURE_NAMES, Screen, features_arrays  # noqa: E402


def pr_at(y: np.ndarray, flag: np.ndarray) -> dict:
    tp = int((flag & y).sum())
    fp = int((flag & ~y).sum())
    fn = int((~flag & y).sum())
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "tp": tp, "fp": fp,
            "fn": fn, "flagged_share_of_singles": fp / max(int((~y).sum()), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(data.default_data_dir() or "../shared/data/pbc"))
    ap.add_argument("--screen", help="screen JSON (default: bundled)")
    ap.add_argument("--checkset", default=str(ROOT / "docs/screen/checkset.csv"))
    ap.add_argument("--classifier", help="run folder of a trained classifier (optional)")
    ap.add_argument("--out", default=str(ROOT / "docs/screen"))
    args = ap.parse_args(argv)

    scr = Screen.load(args.screen)
    ds = data.scan(args.data)
    splits = data.make_split(ds)  # seed 42, 64/16/20: the split every run uses
    images, _ = data.load_images(ds, scr.image_size, progress=False)
    index = {s.path: i for i, s in enumerate(ds.samples)}

    with open(args.checkset, newline="") as f:
        check = list(csv.DictReader(f))
    ci = np.array([index[r["path"]] for r in check])
    y = np.array([r["label"] == "multi" for r in check])
    is_random = np.array([r["note"].startswith("random") for r in check])
    is_held = np.array([r["note"].startswith("held-out") for r in check])
    test = data.split_indices(splits, "test")

    need = np.union1d(ci, test)
    t0 = time.perf_counter()
    feats = dict(zip(need.tolist(), features_arrays(images[need], scr.params)))
    secs = time.perf_counter() - t0
    fc = np.stack([feats[i] for i in ci])
    ft = np.stack([feats[i] for i in test])
    sc_c, sc_t = scr.score_features(fc), scr.score_features(ft)
    nreg = FEATURE_NAMES.index("n_regions")

    res = {"command": "BLOODCELL_CACHE=/work/cache .venv/bin/python benchmarks/screen_eval.py"
                      + (f" --classifier {args.classifier}" if args.classifier else ""),
           "threshold": scr.threshold, "feature_seconds_per_image": secs / len(need),
           "checkset": {"n": len(y), "multi": int(y.sum()), "single": int((~y).sum()),
                        "random_part": {"n": int(is_random.sum()), "multi": int(y[is_random].sum())},
                        "held_out_part": {"n": int(is_held.sum()), "multi": int(y[is_held].sum())}}}
    flag_c = sc_c > scr.threshold
    res["checkset"]["screen"] = pr_at(y, flag_c)
    res["checkset"]["screen_random_part"] = pr_at(y[is_random], flag_c[is_random])
    res["checkset"]["screen_held_out_part"] = pr_at(y[is_held], flag_c[is_held])
    res["checkset"]["rule_n_regions_ge_2"] = pr_at(y, fc[:, nreg] >= 2)
    per_class = {}
    for c in sorted({r["class"] for r in check}):
        sel = np.array([r["class"] == c for r in check])
        per_class[c] = {"multi": int(y[sel].sum()), "single": int((~y[sel]).sum()),
                        "recall": float(flag_c[sel & y].mean()) if (sel & y).any() else None,
                        "singles_flagged": float(flag_c[sel & ~y].mean())}
    res["checkset"]["per_class"] = per_class

    # PR curve over the threshold
    from sklearn.metrics import average_precision_score, precision_recall_curve
    prec, rec, thr = precision_recall_curve(y, sc_c)
    res["checkset"]["average_precision"] = float(average_precision_score(y, sc_c))
    ok = (prec[:-1] >= 0.8)
    res["checkset"]["best_recall_at_precision_0.8"] = float(rec[:-1][ok].max()) if ok.any() else 0.0

    # test split: share flagged per class
    labels_t = ds.labels[test]
    flag_t = sc_t > scr.threshold
    res["test"] = {"n": int(len(test)), "flagged": int(flag_t.sum()), "flagged_share": float(flag_t.mean()),
                   "per_class": {c: {"n": int((labels_t == k).sum()),
                                     "flagged_share": float(flag_t[labels_t == k].mean())}
                                 for k, c in enumerate(ds.classes)}}

    if args.classifier:
        from bloodcell.predict import Classifier
        from bloodcell.transforms import preprocess
        clf = Classifier.load(args.classifier)
        if clf.image_size == scr.image_size:
            timgs = np.asarray(images[test])
        else:
            timgs = np.stack([preprocess(ds.root / ds.samples[i].path, clf.image_size) for i in test])
        probs = np.concatenate([clf.predict_proba_arrays(timgs[i:i + 128]) for i in range(0, len(test), 128)])
        correct = probs.argmax(1) == labels_t
        rows = []
        for thr_ in sorted({scr.threshold, -5.0, -2.0, 2.0, 5.0}):
            keep = sc_t <= thr_
            rows.append({"threshold": thr_, "coverage": float(keep.mean()),
                         "accuracy_screened_in": float(correct[keep].mean()) if keep.any() else None,
                         "accuracy_screened_out": float(correct[~keep].mean()) if (~keep).any() else None})
        res["classifier"] = {"run": args.classifier, "accuracy_all": float(correct.mean()),
                             "coverage_vs_accuracy": rows}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(rec, prec, label=f"screen (AP {res['checkset']['average_precision']:.2f})")
    p0 = res["checkset"]["screen"]
    ax.plot([p0["recall"]], [p0["precision"]], "o", label=f"threshold {scr.threshold:g}")
    rr = res["checkset"]["rule_n_regions_ge_2"]
    ax.plot([rr["recall"]], [rr["precision"]], "s", label="rule: n_regions >= 2")
    ax.axhline(0.8, color="grey", lw=0.5, ls="--")
    ax.axvline(0.8, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("recall (multi-cell)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"check set: {int(y.sum())} multi / {int((~y).sum())} single")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pr_curve.png", dpi=110)
    data.atomic_write_json(out / "results.json", res)

    c = res["checkset"]
    print(f"check set: {c['n']} images ({c['multi']} multi, {c['single']} single)")
    for name in ("screen", "screen_random_part", "screen_held_out_part", "rule_n_regions_ge_2"):
        m = c[name]
        print(f"  {name:<22} precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
              f"(tp {m['tp']}, fp {m['fp']}, fn {m['fn']}; singles flagged {100 * m['flagged_share_of_singles']:.1f}%)")
    print(f"  average precision {c['average_precision']:.3f}; best recall at precision>=0.8: "
          f"{c['best_recall_at_precision_0.8']:.3f}")
    for k, v in c["per_class"].items():
        rec_s = "  -  " if v["recall"] is None else f"{v['recall']:.2f}"
        print(f"    {k:<13} multi {v['multi']:>3} recall {rec_s}   single {v['single']:>3} "
              f"flagged {100 * v['singles_flagged']:.1f}%")
    t = res["test"]
    print(f"test split: {t['flagged']}/{t['n']} flagged ({100 * t['flagged_share']:.1f}%)")
    for k, v in t["per_class"].items():
        print(f"    {k:<13} {100 * v['flagged_share']:5.1f}% of {v['n']}")
    if "classifier" in res:
        r = res["classifier"]
        print(f"classifier {r['run']}: accuracy on all test images {r['accuracy_all']:.4f}")
        for row in r["coverage_vs_accuracy"]:
            print(f"  threshold {row['threshold']:>5}: coverage {row['coverage']:.3f}  "
                  f"screened-in {row['accuracy_screened_in']}  screened-out {row['accuracy_screened_out']}")
    print(f"features: {1000 * res['feature_seconds_per_image']:.1f} ms/image; wrote {out}/results.json, pr_curve.png")


if __name__ == "__main__":
    main()
