"""`bloodcell evaluate`: the CLI, its three files and how they agree, and the
bootstrap interval of the accuracy."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import CLASSES

from bloodcell import data as D
from bloodcell.cli import main
from bloodcell.evaluate import bootstrap_ci
from test_predict import make_model


def _read(out):
    return (json.loads((out / "metrics.json").read_text()), json.loads((out / "evaluation.json").read_text()),
            list(csv.DictReader(open(out / "predictions.csv", newline=""))))


def test_evaluate_cli_files_agree_with_each_other(synthetic_dataset, tmp_path, capsys):
    """A model without a split.csv: evaluate re-derives the seed-42 split, classifies its
    test part, and every number of metrics.json follows from predictions.csv."""
    model = make_model(tmp_path / "model", gain=50.0)  # random, but its answers vary by image
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(model), "--data", str(synthetic_dataset), "--split", "test",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    m, ev, rows = _read(out)
    ds = D.scan(synthetic_dataset)
    D.load_images(ds, 64, progress=False)  # drops the file that only decoding finds broken
    test = D.split_indices(D.make_split(ds), "test")
    assert sorted(r["path"] for r in rows) == sorted(ds.samples[i].path for i in test)
    assert all(r["true"] == r["path"].split("/")[0] for r in rows)
    p = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    assert np.allclose(p.sum(1), 1, atol=1e-4)
    assert [r["predicted"] for r in rows] == [CLASSES[k] for k in p.argmax(1)]
    true = np.array([CLASSES.index(r["true"]) for r in rows])
    pred = p.argmax(1)
    assert len(set(pred)) > 1
    assert m["n_images"] == len(rows) and m["classes"] == CLASSES
    assert m["accuracy"] == pytest.approx((true == pred).mean())
    cm = np.array(m["confusion_matrix"])  # rows = true class
    assert cm.tolist() == [[int(((true == i) & (pred == j)).sum()) for j in range(8)] for i in range(8)]
    for i, c in enumerate(CLASSES):
        pc = m["per_class"][c]
        assert pc["support"] == int((true == i).sum())
        assert pc["recall"] == pytest.approx(cm[i, i] / max(1, cm[i].sum()))
        assert pc["precision"] == pytest.approx(cm[i, i] / cm[:, i].sum() if cm[:, i].sum() else 0.0)
    assert m["macro_f1"] == pytest.approx(np.mean([m["per_class"][c]["f1"] for c in CLASSES]))
    assert {s["path"] for s in m["skipped"]} == {"neutrophil/.DS_000.jpg", "platelet/empty.jpg",
                                                 "basophil/notes.txt", "eosinophil/broken.jpg"}
    lo, hi = ev["accuracy_ci95"]
    assert lo <= m["accuracy"] <= hi and hi - lo > 0.05  # ~20 images: a wide interval
    assert ev["split"] == "test" and ev["backend"] == "torch" and ev["n_images"] == len(rows)
    # the printed table: every class, the accuracy with its interval, the skipped files
    assert all(c in text for c in CLASSES) and "skipped 4 file(s)" in text
    assert f"accuracy {m['accuracy']:.4f} (95% bootstrap CI {lo:.4f}-{hi:.4f})" in text
    # through ONNX Runtime (what `bloodcell predict` runs): the same answers
    assert main(["evaluate", "--model", str(model), "--data", str(synthetic_dataset), "--out",
                 str(tmp_path / "ev-onnx"), "--backend", "onnx", "--no-progress"]) == 0
    _, ev2, rows2 = _read(tmp_path / "ev-onnx")
    assert ev2["backend"] == "onnx" and [r["predicted"] for r in rows2] == [r["predicted"] for r in rows]


def test_evaluate_uses_the_runs_own_split(synthetic_dataset, tmp_path):
    """A run folder's split.csv decides which images are 'test', not the seed."""
    model = make_model(tmp_path / "model")
    ds = D.scan(synthetic_dataset)
    D.load_images(ds, 64, progress=False)
    splits = D.make_split(ds, seed=7)  # another split than the default seed's
    D.write_manifest(model / "split.csv", ds, splits)
    assert main(["evaluate", "--model", str(model), "--data", str(synthetic_dataset), "--split", "val",
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    _, _, rows = _read(tmp_path / "ev")
    assert sorted(r["path"] for r in rows) == sorted(ds.samples[i].path for i in D.split_indices(splits, "val"))


def test_bootstrap_ci_of_accuracy():
    correct = np.r_[np.ones(900), np.zeros(100)]
    lo, hi = bootstrap_ci(correct)
    # the normal approximation: 0.9 +- 1.96 * sqrt(0.9 * 0.1 / 1000) = 0.881..0.919
    assert lo == pytest.approx(0.881, abs=0.004) and hi == pytest.approx(0.919, abs=0.004)
    assert bootstrap_ci(correct) == [lo, hi]  # seeded: reproducible
    assert bootstrap_ci(np.ones(50)) == [1.0, 1.0]
    w_small = np.subtract(*bootstrap_ci(correct[::10])[::-1])
    assert w_small > 2.5 * (hi - lo)  # 10x fewer images: ~3.2x wider
    assert all(np.isnan(bootstrap_ci(np.array([]))))
