"""Calibration: temperature scaling fitted on the validation split, and the
review threshold that flags the images the model is least sure of.

The temperature minimises the negative log-likelihood of the validation labels
(Guo et al. 2017); it divides the logits, so the predicted class never changes,
only how confident the probabilities are. The review threshold is chosen on
validation too, as the lowest calibrated confidence at which the images kept
(not flagged) still reach the target accuracy; the test split only reports.
Both go into the model's model.json (atomically), where ``Classifier`` and
``evaluate`` apply them, with the colour statistics of the training images that
the input checks compare new images to (bloodcell.inputcheck).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import data as D
from .modelfile import ModelFile, resolve_model_path

log = logging.getLogger("bloodcell")

ECE_BINS = 15
DEFAULT_TARGET_ACCURACY = 0.995  # the bundled model's choice: ~4 % flagged (0.998 flags ~40 %)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    lp = log_softmax(np.asarray(logits, np.float64) / temperature)
    return float(-lp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising NLL(softmax(logits / T), y); a 1-D convex-enough problem in log T."""
    from scipy.optimize import minimize_scalar
    y = np.asarray(y)
    res = minimize_scalar(lambda lt: nll(logits, y, float(np.exp(lt))), bounds=(np.log(0.05), np.log(20.0)),
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over equal-width
    confidence bins, weighted by the share of images in each bin."""
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def choose_threshold(probs: np.ndarray, y: np.ndarray, target: float = DEFAULT_TARGET_ACCURACY) -> float:
    """Lowest confidence threshold whose unflagged images (confidence >= t) reach ``target``
    accuracy, i.e. the fewest images sent to review. 1.0 if even the surest miss it."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == np.asarray(y)).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    cs = conf[order]
    cum_acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    # a threshold keeps whole blocks of tied confidences: look only at block ends
    ends = np.nonzero(np.append(cs[1:] != cs[:-1], True))[0]
    good = ends[cum_acc[ends] >= target]
    if len(good) == 0:
        return float(np.nextafter(cs[0], 2.0)) if len(cs) else 1.0
    return float(cs[good[-1]])


def review_stats(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y)
    keep = conf >= threshold
    return {"threshold": float(threshold), "share_flagged": float(1 - keep.mean()) if len(y) else 0.0,
            "n_flagged": int((~keep).sum()),
            "accuracy_unflagged": float(correct[keep].mean()) if keep.any() else float("nan"),
            "accuracy_flagged": float(correct[~keep].mean()) if (~keep).any() else float("nan"),
            "accuracy_all": float(correct.mean()) if len(y) else float("nan")}


def split_logits(model_path, data, split_file=None, cache_dir=None, batch_size: int = 128,
                 progress: bool = True, backend: str = "onnx") -> dict:
    """Raw logits and labels of the val and test splits (decoded-image cache; ONNX Runtime
    by default, which gives PyTorch's logits to ~1e-5 at several times the speed), and
    the input check fitted on the train split with its flag rates on val and test."""
    from .inputcheck import InputCheck, fit_input_check
    from .predict import Classifier
    from .runtime import batched_logits
    clf = Classifier.load(model_path, backend=backend, screen=None, fallback=None)
    ds = D.scan(data, classes=clf.classes)
    images, _ = D.load_images(ds, clf.image_size, cache_dir, progress=progress, framing=clf.framing)
    splits = D.model_splits(ds, clf.meta.train_args, model_path, split_file)
    out = {"classes": clf.classes}
    train = D.split_indices(splits, "train")
    stats = fit_input_check(images, train) if len(train) else None
    check = InputCheck(stats, clf.image_size)
    for name in ("val", "test"):
        idx = D.split_indices(splits, name)
        if len(idx) == 0:
            raise ValueError(f"no images in the {name} split of {data}")
        logits = batched_logits(clf.runner, images, idx, batch_size)
        out[name] = (logits, ds.labels[idx])
        if stats is not None:
            stats[f"share_flagged_{name}"] = float((check.distance(images[idx]) > stats["threshold"]).mean())
    out["input_check"] = stats
    return out


def calibrate_logits(val: tuple, test: tuple, target: float = DEFAULT_TARGET_ACCURACY) -> dict:
    """Fit T and the review threshold on ``val`` = (logits, y); report both splits."""
    from .runtime import softmax
    (zv, yv), (zt, yt) = val, test
    t = fit_temperature(zv, yv)
    pv, pt = softmax(zv / t), softmax(zt / t)
    thr = choose_threshold(pv, yv, target)
    rep = {"temperature": t, "review_threshold": thr, "target_accuracy_unflagged": target,
           "ece_bins": ECE_BINS}
    for name, z, y, p in (("val", zv, yv, pv), ("test", zt, yt, pt)):
        p1 = softmax(z)
        rep[name] = {"n_images": int(len(y)), "accuracy": float((p.argmax(1) == y).mean()),
                     "ece_before": ece(p1, y), "ece_after": ece(p, y),
                     "nll_before": nll(z, y), "nll_after": nll(z, y, t),
                     "review": review_stats(p, y, thr)}
    return rep


def store_calibration(model_path, temperature: float, review_threshold: float, report: dict | None = None,
                      input_check: dict | None = None):
    """Write temperature + review_threshold (and a short calibration record, and the
    input check's statistics) into model.json."""
    _, j = resolve_model_path(model_path)
    meta = ModelFile.load(j)
    meta.temperature = float(temperature)
    meta.review_threshold = float(review_threshold)
    if input_check is not None:
        meta.input_check = input_check
    if report is not None:
        meta.calibration = {k: report[k] for k in ("target_accuracy_unflagged", "ece_bins") if k in report}
        meta.calibration.update({s: dict(report[s]) for s in ("val", "test") if s in report})
    return meta.save(j)


def calibrate(model_path, data, out=None, split_file=None, cache_dir=None,
              target: float = DEFAULT_TARGET_ACCURACY, progress: bool = True, store: bool = True,
              backend: str = "onnx") -> dict:
    lg = split_logits(model_path, data, split_file, cache_dir, progress=progress, backend=backend)
    rep = calibrate_logits(lg["val"], lg["test"], target)
    rep["model"] = str(model_path)
    rep["data"] = str(data)
    ic = lg["input_check"]
    if ic is not None:
        rep["input_check"] = {k: ic[k] for k in ("quantile", "threshold", "n_images",
                                                 "share_flagged_val", "share_flagged_test")}
    if store:
        rep["stored_in"] = str(store_calibration(model_path, rep["temperature"], rep["review_threshold"],
                                                 rep, input_check=ic))
    if out:
        D.atomic_write_json(Path(out), rep)
    return rep


def format_report(r: dict) -> str:
    lines = [f"temperature {r['temperature']:.4f} (fitted on val, NLL), review threshold "
             f"{r['review_threshold']:.4f} (chosen on val for >= {100 * r['target_accuracy_unflagged']:.2f}% "
             "accuracy on unflagged images)"]
    for s in ("val", "test"):
        v = r[s]
        rv = v["review"]
        lines.append(f"{s:<5} n={v['n_images']}: accuracy {100 * v['accuracy']:.2f}%, "
                     f"ECE({r['ece_bins']} bins) {100 * v['ece_before']:.2f}% -> {100 * v['ece_after']:.2f}%, "
                     f"NLL {v['nll_before']:.4f} -> {v['nll_after']:.4f}; "
                     f"flagged {100 * rv['share_flagged']:.1f}% ({rv['n_flagged']}), "
                     f"accuracy on unflagged {100 * rv['accuracy_unflagged']:.2f}%")
    ic = r.get("input_check")
    if ic:
        lines.append(f"input check: colour statistics of {ic['n_images']} train images, threshold "
                     f"{ic['threshold']:.2f} ({100 * ic['quantile']:.1f}% of them under it); flags "
                     f"{100 * ic['share_flagged_val']:.2f}% of val, {100 * ic['share_flagged_test']:.2f}% of test")
    return "\n".join(lines)
