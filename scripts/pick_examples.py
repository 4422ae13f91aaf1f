"""Choose the 16 example cells bundled in ``src/bloodcell/examples`` (issue 18).

    .venv/bin/python scripts/pick_examples.py ../shared/data/pbc [--copy]

Two per class, from the TRAIN part of the seed-42 64/16/20 split that the bundled
model was trained and evaluated with (``evaluate`` re-derives it from the seed
recorded in model.json), so the examples never touch the test split. Among 40
candidates per class (the first train images in content-hash order, i.e. a fixed
pseudo-random draw), keep those the bundled model classifies correctly and above
its review threshold, with no input warning and that the multi-cell screen scores
as single (lowest score first, one stained group preferred), at most one per
file-name sub-type (BNE/SNE, MY/MMY/PMY...). With ``--copy`` the chosen files are
copied byte for byte to ``src/bloodcell/examples/<class>/<original name>``.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from bloodcell import data as D
from bloodcell.predict import Classifier

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "bloodcell" / "examples"
PER_CLASS, CANDIDATES = 2, 40


def candidates(root: Path, clf: Classifier) -> dict[str, list[str]]:
    """class -> relative paths of the first CANDIDATES train images in sha1 order."""
    ds = D.scan(root, classes=clf.classes)
    args = clf.meta.train_args
    splits = D.make_split(ds, tuple(args.get("fractions", D.DEFAULT_FRACTIONS)),
                          int(args.get("split_seed", D.DEFAULT_SEED)))
    out: dict[str, list[str]] = {c: [] for c in clf.classes}
    for s, sp in sorted(zip(ds.samples, splits), key=lambda t: t[0].sha1):
        cls = ds.classes[s.label]
        if sp == "train" and len(out[cls]) < CANDIDATES:
            out[cls].append(s.path)
    return out


def pick(root: Path, clf: Classifier) -> list[tuple[str, dict]]:
    chosen = []
    for cls, rels in candidates(root, clf).items():
        recs = clf.predict([str(root / r) for r in rels], workers=1)
        good = [(r, rec) for r, rec in zip(rels, recs)
                if rec["status"] == "ok" and rec["class"] == cls and not rec["needs_review"]
                and not rec["input_warnings"] and rec.get("multi_cell") is False]
        good.sort(key=lambda t: (t[1]["multi_cell_score"] > -50, t[1]["multi_cell_score"],
                                 -t[1]["probability"]))
        # first a different sub-type each (BNE/SNE, MY/MMY/PMY...), then the next best
        firsts = {}
        for r, rec in good:
            firsts.setdefault(re.split(r"[_\d]", Path(r).name)[0], (r, rec))
        ranked = list(firsts.values()) + [g for g in good if g not in firsts.values()]
        chosen += ranked[:PER_CLASS]
        print(f"{cls}: {len(good)} of {len(rels)} candidates qualify")
    return chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--copy", action="store_true")
    a = ap.parse_args()
    clf = Classifier.load(None, backend="torch", screen="auto")
    chosen = pick(a.data, clf)
    for rel, rec in chosen:
        print(f"{rel}\t{rec['class']}\t{rec['probability']:.4f}\tscreen {rec['multi_cell_score']:.2f}\t"
              f"{(a.data / rel).stat().st_size} B")
        if a.copy:
            dst = EXAMPLES / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(a.data / rel, dst)


if __name__ == "__main__":
    main()
