"""MLflow tracking: `bloodcell train --mlflow` and `bloodcell evaluate --mlflow` make runs
in ./mlflow.db + ./mlruns (parameters, per-epoch metrics, model.json, metrics.json, figures); off, the
tracker does nothing and needs no MLflow."""
from __future__ import annotations

import pytest

from bloodcell.cli import main
from bloodcell.tracking import Tracker, flatten, wanted

mlflow = pytest.importorskip("mlflow", reason="MLflow is the optional extra bloodcell[scale]")


def _runs(root):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bloodcell")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return client, {r.data.tags["bloodcell.command"]: r for r in runs}


def _artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_train_and_evaluate_runs_in_mlruns(synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db, files in ./mlruns
    run = tmp_path / "run"
    assert main(["train", "--model", "cnn3", "--data", str(synthetic_dataset), "--out", str(run),
                 "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--no-pretrained",
                 "--no-progress", "--mlflow"]) == 0
    assert main(["evaluate", "--model", str(run), "--data", str(synthetic_dataset), "--split", "val",
                 "--out", str(tmp_path / "ev"), "--no-progress", "--mlflow"]) == 0
    client, runs = _runs(tmp_path)
    tr, ev = runs["train"], runs["evaluate"]
    assert tr.info.status == ev.info.status == "FINISHED"
    assert tr.data.params["model"] == "cnn3" and tr.data.params["image_size"] == "32"
    curve = client.get_metric_history(tr.info.run_id, "val_accuracy")
    assert [m.step for m in curve] == [1, 2]
    assert {"model.json", "history.jsonl", "train_summary.json"} <= set(_artifacts(client, tr.info.run_id))
    assert ev.data.params["split"] == "val"
    assert 0 <= ev.data.metrics["accuracy"] <= 1 and "f1.basophil" in ev.data.metrics
    files = set(_artifacts(client, ev.info.run_id))
    assert {"metrics.json", "predictions.csv", "figures/confusion_pct.png", "figures/errors.png"} <= files


def test_a_failed_run_is_marked_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # on, no flag
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with Tracker.start("train", run_name="boom") as t:
            t.metrics({"loss": 1.5, "note": "text", "nan": float("nan")}, step=1)
            raise RuntimeError("boom")
    client, runs = _runs(tmp_path)
    assert runs["train"].info.status == "FAILED"
    assert runs["train"].data.metrics == {"loss": 1.5}  # text and NaN are not metrics


def test_off_tracker_does_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not wanted(False) and wanted(True)
    with Tracker.start("train", enabled=False) as t:
        assert not t.active
        t.params({"a": 1})
        t.metrics({"b": 2.0}, step=1)
        t.artifacts([tmp_path])
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert flatten({"a": {"b": 1, "c": {}}, "d": None}) == {"a.b": "1", "a.c": "{}", "d": "None"}
