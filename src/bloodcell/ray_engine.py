"""``bloodcell predict PATHS --engine ray``: the same records as the local engine, for
archives too big for one process.

Ray Data reads the files (``read_binary_files``: local folders, or the object-store
URIs its and pyarrow's file systems know); an actor pool (``map_batches``) holds one
``Classifier`` per actor, each decoding with the classifier's own decode path (the
one preprocessing definition, the cell framing of a framing model, the multi-cell
screen and the input checks) and running the model through ONNX Runtime on one
thread; the driver gathers the records in input order and writes them as the local
engine does (CSV/JSON), or streams them to Parquet for big runs. Files that cannot
be read as images get a ``skipped: <reason>`` row; the run goes on.

On a cluster every node must see the input paths and ``--model`` (a shared file
system or object-store URIs); the bundled model comes with the installed package.
Ray is the optional extra ``bloodcell[scale]``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger("bloodcell")

_URI = "://"  # s3://, gs://, abfs://...: listed and read by Ray/pyarrow, not expanded here


@dataclass
class RayOptions:
    """Where and how wide: ``address`` None starts a local Ray instance (or joins the one
    RAY_ADDRESS names); ``actors`` defaults to the cluster's CPUs; ``num_cpus`` caps a
    local instance."""
    address: str | None = None
    actors: int | None = None
    num_cpus: int | None = None
    batch_size: int = 64


@dataclass
class ModelSpec:
    """What each actor loads: plain values, so that Ray can ship them to any node."""
    model: str | None            # run folder / model file; None = the bundled model
    backend: str = "onnx"
    screen: str | None = "auto"  # "auto", None, or a screen file
    review_threshold: float | None = None
    onnx_path: str | None = None  # the driver's ONNX file: used where a node sees it (no re-export)
    fallback: str | None = "auto"  # the other-labs model: "auto", None or a model path
    review_views: int = 1          # Classifier's review_views


class ClassifyBatch:
    """One actor: a Classifier on one thread; a Ray Data batch of files -> one JSON record each."""

    def __init__(self, spec: ModelSpec):
        from .predict import Classifier
        onnx = spec.onnx_path if spec.onnx_path and Path(spec.onnx_path).is_file() else None
        self.clf = Classifier.load(spec.model, backend=spec.backend, screen=spec.screen, onnx_path=onnx,
                                   review_threshold=spec.review_threshold, threads=1, fallback=spec.fallback,
                                   review_views=spec.review_views)

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        sources = [bytes(b) for b in batch["bytes"]]
        records: list = [None] * len(paths)
        # workers=0: decode inline -- Ray runs one actor per CPU, the parallelism is there
        for part in self.clf.iter_predict(sources, names=paths, batch_size=len(paths), workers=0):
            for i, rec in part:
                records[i] = rec
        return {"path": np.array(paths, dtype=object),
                "record": np.array([json.dumps(r) for r in records], dtype=object)}


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'bloodcell[scale]'") from None
    return ray


def connect(opts: RayOptions):
    """Join the cluster at ``opts.address`` (or RAY_ADDRESS), else start a local instance."""
    ray = _ray()
    if not ray.is_initialized():
        address = opts.address or os.environ.get("RAY_ADDRESS")
        kw = {} if address else {"num_cpus": opts.num_cpus}
        if not address:  # Ray nices its workers (15); here they are the job, not a side task
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, **kw)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-stage chatter every 10 s
    return ray


def _key(path: str) -> str:
    """Ray Data reports local paths absolute and without a scheme: match on that."""
    return path if _URI in path else os.path.abspath(path)


def iter_records(paths: list[str], spec: ModelSpec, opts: RayOptions) -> Iterator[tuple[str, dict]]:
    """(path, record) for every file under ``paths``, as the actors finish them."""
    if not paths:
        return
    ray = connect(opts)
    n = opts.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # reading is I/O: it must not wait for a CPU that the classifier actors all hold
    ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=0)
    ds = ds.map_batches(ClassifyBatch, fn_constructor_args=(spec,), batch_size=opts.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=n), num_cpus=1,
                        batch_format="numpy")
    for batch in ds.iter_batches(batch_size=opts.batch_size, batch_format="numpy"):
        for p, r in zip(batch["path"], batch["record"]):
            yield str(p), json.loads(r)


def predict_ray(clf, specs: Sequence[str], spec: ModelSpec, opts: RayOptions, out=None,
                include_flagged: bool = False, progress: bool = True) -> tuple[list[dict], dict]:
    """Classify every image under ``specs`` on Ray -> (records, summary) as
    ``predict.predict_paths`` gives them: local inputs in their listed order, then the
    files under object-store URIs by name. ``clf`` (the driver's copy) gives the
    classes and the provenance; ``out``: .csv, .json or .parquet."""
    from tqdm import tqdm

    from .batch import check_out_path, expand_inputs, run_summary
    out = check_out_path(out, parquet=True)
    uris = [s for s in specs if _URI in s]
    items = expand_inputs([s for s in specs if _URI not in s]) if len(uris) < len(specs) else []
    by_key = {_key(p): i for i, (p, why) in enumerate(items) if why is None}
    records: list[dict | None] = [None if why is None else {"path": p, "status": f"skipped: {why}"}
                                  for p, why in items]
    remote: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(by_key) or None, unit="img", desc="classifying (ray)",
               disable=not progress, mininterval=0.5)
    for path, rec in iter_records([p for p, why in items if why is None] + uris, spec, opts):
        i = by_key.get(_key(path))
        if i is None:
            remote.append(rec)
        else:
            rec["path"] = items[i][0]  # the name the user gave, as the local engine writes it
            records[i] = rec
        bar.update(1)
    bar.close()
    for i, r in enumerate(records):
        if r is None:  # listed, then gone before Ray read it
            records[i] = {"path": items[i][0], "status": "skipped: not read (removed while running)"}
    records += sorted(remote, key=lambda r: r["path"])
    summary = run_summary(clf, records, seconds=time.perf_counter() - t0,
                          n_computed=sum(r["status"] == "ok" for r in records),
                          batch_size=opts.batch_size, workers=0, include_flagged=include_flagged,
                          engine="ray")
    if out is not None:
        write_any(out, records, clf.classes, summary)
    return records, summary


def write_any(out: Path, records: list[dict], classes: list[str], summary: dict) -> None:
    """.parquet: one row per image, the CSV's columns typed; else as the local engine."""
    from .batch import write_results
    if out.suffix.lower() != ".parquet":
        write_results(out, records, classes, summary)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .batch import flat_records
    rows = flat_records(records, classes, summary)
    table = pa.Table.from_pylist(rows if records else [])
    table = table.replace_schema_metadata({"bloodcell_summary": json.dumps(summary)})
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
