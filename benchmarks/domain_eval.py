"""Other labs' cells: zero-shot accuracy and adaptation curves per external folder.

    PYTHONPATH=src python benchmarks/domain_eval.py ../shared/data/wbc_cellavision \
        [--model RUN] [--ks 5,10,20] [--draws 3] [--json out.json] [--set adabn=0.5 ...] \
        [--zoom 0.8]

Each FOLDER holds class sub-folders named like the model's classes (any letter case).
Per folder:
- zero shot: 8-way accuracy, 5-way accuracy (argmax over the five white-cell
  classes, on the images of those classes) and the share flagged by the input
  checks (the images `bloodcell predict` leaves out of the differential count);
- adaptation curve: for k in --ks and --draws random draws (seed = draw number),
  k cells of each class with at least k+5 images adapt the model
  (``bloodcell.adapt``, settings --set), and the rest of the folder -- including the
  classes left out of the adaptation set -- is the test set: 8-way, 5-way, share
  flagged by the refitted input check, the adaptation's own seconds.
With the bundled model, zero shot runs through `Classifier.predict` on the files, so the
images its input check routes to the bundled other-labs model are that model's answers
(``--no-other-labs``: the bundled model alone); adaptation starts from the main model.
Prints a table (mean +- sd over the draws) and writes everything as JSON.

``--zoom F`` first scales every image about its centre (F < 1 zooms out, padding with
the slide's background colour: ``restyle.zoom``), a fixed zoom for the whole folder, to
measure how much of the gap is the lab's magnification.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.adapt import AdaptSettings, adapt, load_folder
from bloodcell.predict import Classifier
from bloodcell.restyle import zoom as zoom_about_centre
from bloodcell.transforms import open_image

WHITE = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def on_arrays(clf: Classifier, images: np.ndarray, sources) -> tuple[np.ndarray, list]:
    """(probabilities, input warnings) of preprocessed images."""
    probs = np.concatenate([clf.predict_proba_arrays(images[i:i + 64]) for i in range(0, len(images), 64)])
    return probs, clf.check_inputs(images, sources)


def on_files(clf: Classifier, paths: list[Path]) -> tuple[np.ndarray, list]:
    """The same through ``clf.predict`` on the files: what `bloodcell predict` answers,
    with the other-labs model for the images the main model's input check routes to it."""
    recs = clf.predict([str(p) for p in paths])
    bad = [r for r in recs if r["status"] != "ok"]
    if bad:
        raise ValueError(f"{bad[0]['path']}: {bad[0]['status']}")
    routed = sum(r.get("model") == "other-labs" for r in recs)
    print(f"  {routed} of {len(recs)} images answered by the other-labs model", flush=True)
    return (np.array([[r["probabilities"][c] for c in clf.classes] for r in recs]),
            [r["input_warnings"] for r in recs])


def scores(clf: Classifier, probs: np.ndarray, warns: list, labels: np.ndarray) -> dict:
    """8-way, 5-way accuracy and the share with input warnings (the images `bloodcell
    predict` leaves out of the differential count; the multi-cell screen is not run)."""
    white = [clf.classes.index(c) for c in WHITE]
    in5 = np.isin(labels, white)
    pred5 = np.array(white)[probs[:, white].argmax(1)]
    wrong = probs.argmax(1) != labels
    errors = {}
    for t, q in zip(labels[wrong], probs.argmax(1)[wrong]):  # what each class was mistaken for
        key = f"{clf.classes[t]}->{clf.classes[q]}"
        errors[key] = errors.get(key, 0) + 1
    return {"n": int(len(labels)), "acc8": float((probs.argmax(1) == labels).mean()),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
            "acc5": float((pred5[in5] == labels[in5]).mean()) if in5.any() else float("nan"),
            "flagged": float(np.mean([bool(w) for w in warns])),
            "needs_review": float(np.mean([(p.max() < clf.review_threshold) or bool(w)
                                           for p, w in zip(probs, warns)]))}


def draw(labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k cells of each class with >= k+5 images for adaptation; the rest for the test."""
    rng = np.random.default_rng(seed)
    train = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= k + 5:
            train.extend(rng.choice(idx, k, replace=False))
    train = np.sort(np.array(train, dtype=np.int64))
    return train, np.setdiff1d(np.arange(len(labels)), train)


def curve(model, cells, k: int, draws: int, settings: AdaptSettings) -> dict:
    runs = []
    for d in range(draws):
        tr, te = draw(cells.labels, k, d)
        if len(np.unique(cells.labels[tr])) < 2:
            return {"skipped": f"fewer than 2 classes with >= {k + 5} images"}
        s = AdaptSettings(**{**asdict(settings), "seed": d})
        t0 = time.perf_counter()
        a = adapt(model, cells.subset(tr), s)
        secs = time.perf_counter() - t0
        clf = Classifier(a.model, a.meta)
        r = scores(clf, *on_arrays(clf, cells.images[te], [cells.sources[i] for i in te]), cells.labels[te])
        r.update(draw=d, n_adapt=int(len(tr)), adapt_classes=a.report["class_counts"], seconds=round(secs, 1),
                 cpu_seconds=a.report["cpu_seconds"],
                 temperature=a.meta.temperature, cross_fitted=a.report.get("cross_fitted"))
        print(f"    k={k} draw {d}: 8-way {r['acc8']:.3f}, 5-way {r['acc5']:.3f}, flagged {r['flagged']:.2f}, "
              f"T {r['temperature']:.2f}, {secs:.0f} s ({r['cpu_seconds']:.0f} s CPU); errors {r['errors']}",
              flush=True)
        runs.append(r)
    out = {"runs": runs}
    for key in ("acc8", "acc5", "flagged", "seconds", "cpu_seconds"):
        v = np.array([r[key] for r in runs], dtype=float)
        out[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    return out


def parse_settings(pairs: list[str]) -> AdaptSettings:
    kw = dict(p.partition("=")[::2] for p in pairs)
    mode = kw.get("mode", "head")
    defaults = asdict(AdaptSettings(mode=mode))  # the mode's values say each setting's type
    for k, v in kw.items():
        if k not in defaults:
            sys.exit(f"--set {k}={v}: unknown setting; one of {', '.join(defaults)}")
        kind = type(defaults[k])
        kw[k] = v if kind is str else bool(int(v)) if kind is bool else kind(float(v))
    return AdaptSettings(**kw)


def zoomed_copy(folder: str, factor: float, out: Path) -> str:
    """FOLDER's class folders with every image zoomed by ``factor`` (PNG, centre square)."""
    for f in sorted(Path(folder).glob("*/*")):
        try:
            im = open_image(f)
        except ValueError as e:
            print(f"skipped {e}", file=sys.stderr)
            continue
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        square = np.asarray(im.crop((left, top, left + s, top + s)))
        (out / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(zoom_about_centre(square, factor)).save(out / f.parent.name / f"{f.stem}.png")
    return str(out)


def fmt(c: dict, key: str) -> str:
    if "skipped" in c:
        return "-"
    return f"{c[key]['mean']:.3f} ± {c[key]['sd']:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--model", default=None, help="base model (default: the bundled one)")
    ap.add_argument("--ks", default="5,10,20")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="adapt settings")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-other-labs", action="store_true", help="zero shot without the other-labs model")
    ap.add_argument("--zoom", type=float, default=None,
                    help="zoom every image by this factor first (< 1: zoom out); see above")
    a = ap.parse_args()
    import logging

    import torch
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = parse_settings(a.set)
    ks = [int(k) for k in a.ks.split(",") if k]
    base = Classifier.load(a.model, screen=None, **({"fallback": None} if a.no_other_labs else {}))
    results = {"model": a.model or "bundled", "settings": asdict(settings), "draws": a.draws, "folders": {}}
    tmp = tempfile.TemporaryDirectory()
    for folder in a.folders:
        if a.zoom:
            folder = zoomed_copy(folder, a.zoom, Path(tmp.name) / Path(folder).name)
            results["zoom"] = a.zoom
        cells = load_folder(folder, base.classes, base.image_size, base.framing)
        zero = scores(base, *(on_files(base, [Path(folder) / n for n in cells.names]) if base.fallback
                              else on_arrays(base, cells.images, cells.sources)), cells.labels)
        print(f"{folder}: {zero['n']} images {cells.class_counts()}; zero-shot 8-way {zero['acc8']:.3f}, "
              f"5-way {zero['acc5']:.3f}, flagged {zero['flagged']:.2f}", flush=True)
        res = {"class_counts": cells.class_counts(), "zero_shot": zero, "k": {}}
        for k in ks:
            res["k"][str(k)] = curve(a.model, cells, k, a.draws, settings)
        results["folders"][folder] = res
    print(f"\nmodel: {results['model']}; adapt settings: {json.dumps(asdict(settings))}")
    head = "| folder | zero-shot 8-way | 5-way | flagged | " + " | ".join(
        f"k={k} 8-way | k={k} 5-way | k={k} flagged" for k in ks) + " |"
    print(head)
    print("|---" * (4 + 3 * len(ks)) + "|")
    for folder, res in results["folders"].items():
        z = res["zero_shot"]
        cols = [f"{z['acc8']:.3f}", f"{z['acc5']:.3f}", f"{z['flagged']:.2f}"]
        for k in ks:
            c = res["k"][str(k)]
            cols += [fmt(c, "acc8"), fmt(c, "acc5"), fmt(c, "flagged")]
        print(f"| {Path(folder).name} | " + " | ".join(cols) + " |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
