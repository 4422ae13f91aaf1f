"""Evaluation: a saved model on a split of a dataset folder -> metrics.json,
predictions.csv and a printed per-class table (metrics from scikit-learn)."""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data as D

log = logging.getLogger("bloodcell")


# metrics.json holds exactly these keys; extras (CI, split, model) go to evaluation.json
METRICS_KEYS = ("accuracy", "macro_f1", "n_images", "classes", "per_class", "confusion_matrix",
                "skipped")


def bootstrap_ci(correct: np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    """Percentile bootstrap CI of the mean of a 0/1 vector (accuracy)."""
    correct = np.asarray(correct, dtype=np.float64)
    if len(correct) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = rng.choice(correct, size=(n_boot, len(correct)), replace=True).mean(axis=1)
    return [float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))]


def compute_metrics(y_true, probs: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    # macro F1 over the classes the data holds: an absent class would count as F1 0
    present = [k for k in labels if s[k] > 0] or labels
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "accuracy_ci95": bootstrap_ci(y_true == y_pred),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_f1_classes": [classes[k] for k in present],
        "n_images": int(len(y_true)),
        "classes": list(classes),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(s[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def format_table(m: dict) -> str:
    lines = [f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for c, v in m["per_class"].items():
        lines.append(f"{c:<14}{v['precision']:>10.4f}{v['recall']:>10.4f}{v['f1']:>10.4f}{v['support']:>9d}")
    lo, hi = m.get("accuracy_ci95", [float("nan")] * 2)
    lines.append(f"accuracy {m['accuracy']:.4f} (95% bootstrap CI {lo:.4f}-{hi:.4f}), "
                 f"macro F1 {m['macro_f1']:.4f}, n={m['n_images']}")
    return "\n".join(lines)


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: ``metrics`` (metrics.json's keys, the CI, and what was
    evaluated: split, model, backend, data) and the per-image arrays behind them, in one order."""
    metrics: dict
    probs: np.ndarray   # (n, classes), with the model's temperature
    y: np.ndarray       # true class index of each image
    paths: list[str]    # each image's path relative to the data folder


def evaluate(model_path=None, data=None, split: str = "test", out=None, split_file=None,
             batch_size: int = 128, cache_dir=None, progress: bool = True, temperature=None,
             backend: str = "torch") -> Evaluation:
    """Evaluate a saved model (run dir / file; None = bundled) on ``split`` of ``data``,
    through ``backend`` (torch, onnx or onnx-int8: what `bloodcell predict` would run)."""
    from .modelfile import bundled_model_path
    from .predict import Classifier
    from .runtime import batched_logits, softmax
    model_path = Path(model_path) if model_path else bundled_model_path()
    clf = Classifier.load(model_path, backend=backend, screen=None, fallback=None)
    ds = D.scan(data, classes=clf.classes)
    images, _ = D.load_images(ds, clf.image_size, cache_dir, progress=progress, framing=clf.framing)
    if split == "all":
        idx = np.arange(len(ds))
    else:
        try:
            splits = D.model_splits(ds, clf.meta.train_args, model_path, split_file)
        except ValueError as e:  # e.g. another lab's small folder: no split to re-derive
            raise ValueError(f"{e}; `--split all` evaluates every image") from None
        idx = D.split_indices(splits, split)
    if len(idx) == 0:
        raise ValueError(f"no images in split {split!r} of {data}")
    t = clf.temperature if temperature is None else temperature
    probs = softmax(batched_logits(clf.runner, images, idx, batch_size, progress) / t)
    y = ds.labels[idx]
    m = compute_metrics(y, probs, clf.classes)
    m["skipped"] = ds.skipped
    m["split"] = split
    m["model"] = str(model_path)
    m["backend"] = backend
    m["data"] = str(ds.root)
    if out:
        out = Path(out)
        D.atomic_write_json(out / "metrics.json", {k: m[k] for k in METRICS_KEYS})
        D.atomic_write_json(out / "evaluation.json", {
            k: m[k] for k in ("accuracy", "accuracy_ci95", "macro_f1", "n_images", "split",
                              "model", "backend", "data")})
        write_predictions(out / "predictions.csv", [ds.samples[i].path for i in idx],
                          [clf.classes[i] for i in y], probs, clf.classes)
    return Evaluation(m, probs, y, [ds.samples[i].path for i in idx])


def write_predictions(path: Path, paths, true, probs, classes):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true", "predicted"] + [f"p_{c}" for c in classes])
    for pth, t, pr in zip(paths, true, probs):
        w.writerow([pth, t, classes[int(pr.argmax())]] + [f"{v:.6f}" for v in pr])
    D.atomic_write_text(path, buf.getvalue())


def track(tracker, m: dict, out=None) -> None:
    """An evaluation into an experiment tracker (``tracking.Tracker``): what was evaluated,
    the metrics (overall and per class), the written files and the confusion figures."""
    if not tracker.active:
        return
    import tempfile

    from .report import fig_confusion
    tracker.params({k: m[k] for k in ("model", "data", "split", "backend")})
    tracker.metrics({"accuracy": m["accuracy"], "accuracy_ci95_low": m["accuracy_ci95"][0],
                     "accuracy_ci95_high": m["accuracy_ci95"][1], "macro_f1": m["macro_f1"],
                     "n_images": m["n_images"], "n_skipped": len(m["skipped"]),
                     **{f"f1.{c}": v["f1"] for c, v in m["per_class"].items()}})
    with tempfile.TemporaryDirectory() as tmp:
        figs = Path(out or tmp) / "figures"
        figs.mkdir(parents=True, exist_ok=True)
        g = {"generation": None, "model": Path(m["model"]).name, "eval": {"splits": {m["split"]: m}}}
        fig_confusion(g, figs / "confusion_pct.png", figs / "errors.png", split=m["split"])
        files = [Path(out) / n for n in ("metrics.json", "evaluation.json", "predictions.csv")] if out else []
        tracker.artifacts(files + [figs])


def print_report(m: dict) -> None:
    print(format_table(m))
    if m.get("skipped"):
        print(f"skipped {len(m['skipped'])} file(s):")
        for s in m["skipped"]:
            print(f"  {s['path']}: {s['reason']}")

