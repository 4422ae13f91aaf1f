"""Temperature scaling, ECE, review threshold; stored in model.json and applied."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import synthetic_cell

from bloodcell import calibrate as C
from bloodcell import predict as P
from bloodcell.runtime import softmax
from test_predict import make_model


def sample(n=6000, true_t=2.5, seed=0, k=8):
    """Logits whose labels are drawn from softmax(logits / true_t): the fitted T should be true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 6, (n, k)).astype(np.float32)
    cum = np.cumsum(softmax(z.astype(np.float64) / true_t), 1)
    y = np.minimum((cum < rng.random((n, 1))).sum(1), k - 1)
    return z, y


def test_fit_temperature_recovers_truth_and_lowers_ece():
    z, y = sample(true_t=2.5)
    t = C.fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.08)
    assert C.nll(z, y, t) < C.nll(z, y, 1.0)
    before, after = C.ece(softmax(z), y), C.ece(softmax(z / t), y)
    assert before > 0.1 and after < 0.03
    z2, y2 = sample(true_t=0.5, seed=1)  # under-confident logits: T < 1
    assert C.fit_temperature(z2, y2) == pytest.approx(0.5, rel=0.1)


def test_ece_simple_cases():
    probs = np.array([[0.9, 0.1]] * 10)
    y = np.array([0] * 9 + [1])  # 90 % confident, 90 % right: calibrated
    assert C.ece(probs, y) == pytest.approx(0.0, abs=1e-9)
    y_all_right = np.zeros(10, int)
    assert C.ece(probs, y_all_right) == pytest.approx(0.1)


def test_choose_threshold_reaches_target_with_least_review():
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.90, 0.80, 0.70])
    right = np.array([1, 1, 1, 1, 0, 1, 0, 1], bool)
    probs = np.stack([conf, 1 - conf], 1)
    y = np.where(right, 0, 1)
    assert C.choose_threshold(probs, y, target=1.0) == pytest.approx(0.96)
    assert C.choose_threshold(probs, y, target=0.8) == pytest.approx(0.90)  # 5/6 kept are right
    assert C.choose_threshold(probs, y, target=0.7) == pytest.approx(0.70)
    st = C.review_stats(probs, y, 0.96)
    assert st["accuracy_unflagged"] == 1.0 and st["share_flagged"] == pytest.approx(0.5)
    # a tie that a threshold cannot split is kept or flagged as a whole
    tie = np.stack([np.array([0.9, 0.9, 0.8]), 1 - np.array([0.9, 0.9, 0.8])], 1)
    assert C.choose_threshold(tie, np.array([0, 1, 0]), target=1.0) > 0.9


def test_calibration_stored_and_applied(tmp_path, synthetic_dataset, capsys):
    """End to end on a tiny model: CLI fits T on val, writes model.json; Classifier applies it."""
    from bloodcell.cli import main
    d = make_model(tmp_path / "m", gain=200.0)
    x = np.stack([synthetic_cell(k, seed=k) for k in range(8)])
    p_before = P.Classifier.load(d, backend="torch", screen=None).predict_proba_arrays(x)
    rep_path = tmp_path / "calib.json"
    assert main(["calibrate", "--model", str(d), "--data", str(synthetic_dataset),
                 "--out", str(rep_path), "--no-progress"]) == 0
    assert "ECE(15 bins)" in capsys.readouterr().out
    rep = json.loads(rep_path.read_text())
    meta = json.loads((d / "model.json").read_text())
    assert meta["temperature"] == pytest.approx(rep["temperature"]) and rep["temperature"] != 1.0
    assert meta["review_threshold"] == pytest.approx(rep["review_threshold"])
    assert rep["val"]["nll_after"] <= rep["val"]["nll_before"] + 1e-9
    for s in ("val", "test"):
        assert 0 <= rep[s]["review"]["share_flagged"] <= 1
    clf = P.Classifier.load(d, backend="torch", screen=None)
    assert clf.temperature == pytest.approx(rep["temperature"])
    assert clf.review_threshold == pytest.approx(rep["review_threshold"])
    p_after = clf.predict_proba_arrays(x)
    assert (p_after.argmax(1) == p_before.argmax(1)).all()
    assert np.abs(p_after - p_before).max() > 1e-3
    # the evaluation path applies the same temperature
    from bloodcell.evaluate import evaluate
    ev = evaluate(d, synthetic_dataset, split="test", progress=False)
    files = [synthetic_dataset / p for p in ev.paths]
    assert np.abs(ev.probs - clf.predict_proba(files)).max() < 1e-5


def test_dry_run_leaves_model_alone(tmp_path, synthetic_dataset):
    d = make_model(tmp_path / "m", gain=200.0)
    before = (d / "model.json").read_text()
    r = C.calibrate(d, synthetic_dataset, store=False, progress=False)
    assert (d / "model.json").read_text() == before and "stored_in" not in r


def test_target_must_be_an_accuracy(tmp_path, synthetic_dataset, capsys):
    from bloodcell.cli import main
    d = make_model(tmp_path / "m")
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(d), "--data", str(synthetic_dataset), "--target", "1.5"])
    assert e.value.code == 2 and "1.5 is out of range (must be over 0 and at most 1)" in capsys.readouterr().err
    assert C.DEFAULT_TARGET_ACCURACY == 0.995  # the bundled model's setting (README, model card)
