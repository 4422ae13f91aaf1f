"""Experiment tracking in MLflow: one ``Tracker`` per run of train, evaluate or study.

Off unless asked (``--mlflow``, or ``MLFLOW_TRACKING_URI`` set): then a no-op object
whose methods do nothing, so the training loop calls it unconditionally. On, it logs
to ``MLFLOW_TRACKING_URI`` or, by default, to MLflow's own local default: the runs in
``./mlflow.db`` (SQLite; MLflow 3 retired its file store) and their files under
``./mlruns``, offline -- ``mlflow ui`` in the same folder shows them. MLflow is the optional extra
``bloodcell[scale]``; a failing tracking server never stops a training run.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

log = logging.getLogger("bloodcell")

DEFAULT_EXPERIMENT = "bloodcell"
_PARAM_MAX = 6000  # MLflow's limit on a parameter value
MLFLOW_HELP = ("log this run to MLflow: MLFLOW_TRACKING_URI, else ./mlflow.db + ./mlruns "
               "(`mlflow ui` shows them); on whenever MLFLOW_TRACKING_URI is set")


def wanted(flag: bool = False) -> bool:
    """Track when asked by the flag, or when a tracking server is configured."""
    return bool(flag or os.environ.get("MLFLOW_TRACKING_URI"))


def default_uri() -> str:
    return "sqlite:///" + str(Path("mlflow.db").resolve())


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested settings -> MLflow parameters ``a.b = value`` (strings, cut to MLflow's limit)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:_PARAM_MAX]
    return out


class Tracker:
    """An MLflow run, or nothing (``Tracker.off()``). Use as a context manager: the
    run ends FINISHED, or FAILED/KILLED when the block raises."""

    def __init__(self, client=None, run_id: str | None = None):
        self.client, self.run_id = client, run_id

    @classmethod
    def off(cls) -> "Tracker":
        return cls()

    @classmethod
    def start(cls, command: str, run_name: str | None = None, enabled: bool = False,
              experiment: str | None = None, tags: Mapping[str, str] | None = None) -> "Tracker":
        if not wanted(enabled):
            return cls.off()
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ValueError("--mlflow needs MLflow: pip install 'bloodcell[scale]'") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
        client = MlflowClient(tracking_uri=uri)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name)
        run = client.create_run(exp_id, run_name=run_name,
                                tags={"bloodcell.command": command, **(tags or {})})
        log.info("MLflow: run %s in experiment %r at %s", run.info.run_id, name, uri)
        return cls(client, run.info.run_id)

    @property
    def active(self) -> bool:
        return self.client is not None

    def _call(self, what: str, fn, *args, **kw):
        if not self.active:
            return
        try:
            fn(self.run_id, *args, **kw)
        except Exception as e:  # tracking is a record of the run, never a reason to lose it
            log.warning("MLflow: could not log %s (%s: %s)", what, type(e).__name__, e)

    def params(self, params: Mapping) -> None:
        if self.active:
            from mlflow.entities import Param
            self._call("parameters", self.client.log_batch,
                       params=[Param(k, v) for k, v in flatten(params).items()])

    def metrics(self, metrics: Mapping, step: int | None = None) -> None:
        """Numeric, finite values only (an epoch record also holds times and learning rates)."""
        if not self.active:
            return
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self._call("metrics", self.client.log_batch, metrics=ms)

    def artifacts(self, paths: Iterable[str | os.PathLike], folder: str | None = None) -> None:
        """Files (and folders, whole) that exist; others are passed over."""
        if not self.active:
            return
        for p in map(Path, paths):
            if p.is_dir():
                self._call(str(p), self.client.log_artifacts, str(p),
                           artifact_path=(f"{folder}/{p.name}" if folder else p.name))
            elif p.is_file():
                self._call(str(p), self.client.log_artifact, str(p), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._call("the run's end", self.client.set_terminated, status)
            self.client = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb):
        self.end("FINISHED" if exc_type is None else
                 "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
