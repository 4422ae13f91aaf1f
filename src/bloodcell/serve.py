"""``bloodcell serve``: a local review page and HTTP API for the classifier.

A lab technician drops images on the page, sees each cell pre-classified,
and corrects what the model got wrong; corrections live in SQLite (with
timestamp and previous prediction) and export as CSV or as a class-folder
ZIP that ``bloodcell train`` reads. Predictions use ``predict.Classifier``
(the same preprocessing and model code as ``bloodcell predict``).

Uploaded bytes are kept in the database under generated ids: a client's file
name is only ever displayed, never used as a path.
"""
# no `from __future__ import annotations`: FastAPI resolves the endpoint
# annotations at runtime, and its imports are local to create_app
import asyncio
import contextlib
import csv
import hashlib
import inspect
import io
import json
import logging
import os
import queue
import re
import secrets
import sqlite3
import threading
import zipfile
from collections import OrderedDict
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .predict import class_shares, example_files, is_flagged
from .data import csv_safe
from .transforms import ImageError, open_image

log = logging.getLogger("bloodcell")

STATIC_DIR = Path(__file__).resolve().parent / "static"
AUTO = "auto"  # screen=AUTO: use the multi-cell screen when one is installed
EXAMPLES_SAMPLE = "Example cells (PBC dataset)"
_MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


def export_path(cell: dict) -> str:
    """``<label>/<cell id>.<ext>`` in the ZIP export (and named so in the CSV export). The
    extension is one `bloodcell train --data` reads: from the stored media type, else
    the uploaded name's (TIFF, BMP), else png; images are opened by content anyway."""
    from .data import IMAGE_EXTENSIONS
    ext = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif",
           "image/webp": "webp"}.get(cell.get("media_type") or "")
    if ext is None:
        suffix = Path(cell["file_name"]).suffix.lower()
        ext = suffix[1:] if suffix in IMAGE_EXTENSIONS else "png"
    return f"{cell['class']}/{cell['id']}.{ext}"


def default_db_path() -> Path:
    if os.environ.get("BLOODCELL_DB"):
        return Path(os.environ["BLOODCELL_DB"])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "bloodcell" / "lab.sqlite3"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean_name(name: str | None, i: int) -> str:
    """A display name: control characters dropped, length capped. Never a path."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", name or "")[-255:]
    return name or f"file {i + 1}"


# ------------------------------------------------------------------ storage

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
  id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
  id TEXT PRIMARY KEY, sample_id TEXT NOT NULL REFERENCES samples(id),
  file_name TEXT NOT NULL, media_type TEXT, image BLOB NOT NULL, created TEXT NOT NULL,
  model_version TEXT, predicted_class TEXT NOT NULL, probability REAL NOT NULL,
  probabilities TEXT NOT NULL, top3 TEXT NOT NULL, needs_review INTEGER NOT NULL,
  multi_cell INTEGER, multi_cell_score REAL, n_regions INTEGER,
  true_class TEXT, corrected_at TEXT, input_warnings TEXT, image_sha1 TEXT);
CREATE INDEX IF NOT EXISTS cells_sample ON cells(sample_id);
CREATE TABLE IF NOT EXISTS corrections (
  id INTEGER PRIMARY KEY AUTOINCREMENT, cell_id TEXT NOT NULL REFERENCES cells(id),
  created TEXT NOT NULL, previous_prediction TEXT NOT NULL, previous_true_class TEXT,
  true_class TEXT);
"""
_CELL_COLS = ("id, sample_id, file_name, media_type, created, model_version, predicted_class, probability, "
              "probabilities, top3, needs_review, multi_cell, multi_cell_score, n_regions, "
              "true_class, corrected_at, input_warnings")


class Store:
    """SQLite: one connection, serialised by a lock (writes are sub-millisecond)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = threading.Lock()
        self._samples: dict[str, dict] = {}
        # OSError naming the path: `bloodcell serve --db` prints one line, not a sqlite3 traceback
        if str(path) != ":memory:" and self.path.is_dir():
            raise IsADirectoryError(f"database {path} is a folder; give a file path "
                                    f"such as {self.path / 'lab.sqlite3'}")
        if str(path) != ":memory:" and self.path.is_file() and self.path.stat().st_size == 0:
            # SQLite takes a 0-byte file as a new database; it may be one that lost its data
            log.warning("database %s is an empty (0-byte) file: starting a new, empty lab there. "
                        "If it held samples, stop the server and restore it from a backup", path)
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(SCHEMA)
            self._upgrade()
        except (sqlite3.Error, OSError) as e:
            raise OSError(f"cannot use database {path}: {e}") from None

    def _upgrade(self):
        """Databases of earlier versions: add the newer columns. input_warnings stays
        NULL (not checked); image_sha1 is filled in, so duplicates are found there too."""
        cols = {r[1] for r in self.conn.execute("PRAGMA table_info(cells)")}
        if "input_warnings" not in cols:
            self.conn.execute("ALTER TABLE cells ADD COLUMN input_warnings TEXT")
        if "image_sha1" not in cols:
            self.conn.execute("ALTER TABLE cells ADD COLUMN image_sha1 TEXT")
            for cid, image in self.conn.execute("SELECT id, image FROM cells").fetchall():
                self.conn.execute("UPDATE cells SET image_sha1=? WHERE id=?",
                                  (hashlib.sha1(image).hexdigest(), cid))
        self.conn.execute("CREATE INDEX IF NOT EXISTS cells_sample_sha ON cells(sample_id, image_sha1)")

    def close(self):
        with self.lock:
            self.conn.close()

    def _q(self, sql, args=()):
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    # samples
    def sample_for_name(self, name: str) -> dict:
        """The sample called ``name``, created if new (samples are never renamed or
        deleted, so lookups are cached)."""
        with self.lock:
            if name in self._samples:
                return self._samples[name]
            row = self.conn.execute("SELECT * FROM samples WHERE name=?", (name,)).fetchone()
            if row is None:
                sid = secrets.token_hex(6)
                self.conn.execute("INSERT INTO samples VALUES (?,?,?)", (sid, name, _now()))
                row = self.conn.execute("SELECT * FROM samples WHERE id=?", (sid,)).fetchone()
            self._samples[name] = dict(row)
            return dict(row)

    def get_sample(self, sid: str) -> dict | None:
        rows = self._q("SELECT * FROM samples WHERE id=?", (sid,))
        return dict(rows[0]) if rows else None

    def list_samples(self) -> list[dict]:
        rows = self._q(
            "SELECT s.id, s.name, s.created, COUNT(c.id) AS n_cells, COUNT(c.true_class) AS n_corrected, "
            "MAX(c.created) AS updated FROM samples s LEFT JOIN cells c ON c.sample_id = s.id "
            "GROUP BY s.id ORDER BY COALESCE(MAX(c.created), s.created) DESC, s.rowid DESC")
        return [dict(r) for r in rows]

    # cells
    def add_cells(self, rows: list[dict]) -> dict[int, dict]:
        """Store new cells. An image already in the sample (same bytes) is not stored
        again -- a folder dropped twice must not double the differential count: returns
        {row index: the existing cell's id and file_name} for those."""
        dupes = {}
        with self.lock:
            self.conn.execute("BEGIN")
            try:
                for k, row in enumerate(rows):
                    old = self.conn.execute("SELECT id, file_name FROM cells WHERE sample_id=? AND image_sha1=?",
                                            (row["sample_id"], row["image_sha1"])).fetchone()
                    if old is not None:
                        dupes[k] = dict(old)
                        continue
                    self.conn.execute(
                        "INSERT INTO cells (id, sample_id, file_name, media_type, image, created, model_version, "
                        "predicted_class, probability, probabilities, top3, needs_review, multi_cell, "
                        "multi_cell_score, n_regions, input_warnings, image_sha1) VALUES (:id, :sample_id, "
                        ":file_name, :media_type, :image, :created, :model_version, :predicted_class, "
                        ":probability, :probabilities, :top3, :needs_review, :multi_cell, :multi_cell_score, "
                        ":n_regions, :input_warnings, :image_sha1)", row)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return dupes

    def cells(self, sid: str) -> list[dict]:
        return [_cell_json(r) for r in
                self._q(f"SELECT {_CELL_COLS} FROM cells WHERE sample_id=? ORDER BY rowid", (sid,))]

    def cell(self, cid: str) -> dict | None:
        rows = self._q(f"SELECT {_CELL_COLS} FROM cells WHERE id=?", (cid,))
        return _cell_json(rows[0]) if rows else None

    def cell_image(self, cid: str) -> tuple[bytes, str | None] | None:
        rows = self._q("SELECT image, media_type FROM cells WHERE id=?", (cid,))
        return (rows[0]["image"], rows[0]["media_type"]) if rows else None

    def correct(self, cid: str, true_class: str | None) -> dict | None:
        """Set (or with None, clear) a cell's true class; every change is logged."""
        with self.lock:
            row = self.conn.execute("SELECT predicted_class, true_class FROM cells WHERE id=?",
                                    (cid,)).fetchone()
            if row is None:
                return None
            ts = _now()
            self.conn.execute("BEGIN")
            self.conn.execute("UPDATE cells SET true_class=?, corrected_at=? WHERE id=?",
                              (true_class, ts if true_class else None, cid))
            self.conn.execute("INSERT INTO corrections (cell_id, created, previous_prediction, "
                              "previous_true_class, true_class) VALUES (?,?,?,?,?)",
                              (cid, ts, row["predicted_class"], row["true_class"], true_class))
            self.conn.execute("COMMIT")
        return self.cell(cid)

    def corrections(self, cid: str) -> list[dict]:
        return [dict(r) for r in self._q(
            "SELECT created, previous_prediction, previous_true_class, true_class FROM corrections "
            "WHERE cell_id=? ORDER BY id", (cid,))]


def _cell_json(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["probabilities"] = json.loads(d["probabilities"])
    d["top3"] = json.loads(d["top3"])
    d["needs_review"] = bool(d["needs_review"])
    d["input_warnings"] = json.loads(d["input_warnings"]) if d.get("input_warnings") else []
    if d["multi_cell"] is None:
        for k in ("multi_cell", "multi_cell_score", "n_regions"):
            d.pop(k)
    else:
        d["multi_cell"] = bool(d["multi_cell"])
    d["class"] = d["true_class"] or d["predicted_class"]  # what the differential counts
    d["corrected"] = d["true_class"] is not None
    return d


def differential(cells: list[dict], classes: list[str]) -> dict:
    """Counts as ``bloodcell predict`` gives them: flagged cells are left out, unless
    a reviewer set their class (then that class counts). app.js renderDiff agrees."""
    counted = [c for c in cells if c["corrected"] or not is_flagged(c)]
    counts = {c: 0 for c in classes}
    for c in counted:
        counts[c["class"]] = counts.get(c["class"], 0) + 1
    n = len(counted)
    return {"total": n, "n_cells": len(cells), "n_left_out": len(cells) - n, "counts": counts,
            **class_shares(counts), "n_corrected": sum(c["corrected"] for c in cells),
            "n_needs_review": sum(c["needs_review"] and not c["corrected"] for c in cells),
            "n_multi_cell": sum(bool(c.get("multi_cell")) for c in cells),
            "n_input_warnings": sum(bool(c.get("input_warnings")) for c in cells)}


# ------------------------------------------------------------------ model worker

class ModelWorker:
    """The one thread that touches the torch model. Requests queue here and
    concurrent single-image predictions are run as one batch (micro-batching):
    cheaper per image, and no lock contention around the model."""

    def __init__(self, clf, max_batch: int = 32):
        self.clf, self.max_batch = clf, max_batch
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="bloodcell-model", daemon=True)
        self.thread.start()

    def close(self):
        self.q.put(None)

    def submit(self, kind: str, *payload) -> Future:
        fut: Future = Future()
        self.q.put((kind, payload, fut))
        return fut

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            jobs, other = [item], []
            if item[0] == "predict":  # gather the predictions already waiting
                n = len(item[1][0])
                while n < self.max_batch:
                    try:
                        nxt = self.q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self.q.put(None)
                        break
                    (jobs if nxt[0] == "predict" else other).append(nxt)
                    n += len(nxt[1][0]) if nxt[0] == "predict" else 0
                self._predict(jobs)
            else:
                other = jobs
            for kind, payload, fut in other:
                if kind == "predict":
                    self._predict([(kind, payload, fut)])
                    continue
                try:
                    fut.set_result(payload[0](*payload[1:]))
                except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                    fut.set_exception(e)

    def _predict(self, jobs):
        try:
            probs = self.clf.predict_proba_arrays(np.concatenate([np.stack(p[0]) for _, p, _ in jobs]))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
            for _, _, fut in jobs:
                fut.set_exception(e)
            return
        i = 0
        for _, p, fut in jobs:
            n = len(p[0])
            fut.set_result(probs[i:i + n])
            i += n


def _load_screen(screen):
    """screen=AUTO: the installed multi-cell screen if there is one, else none."""
    if screen != AUTO:
        return screen
    try:
        from .screen import Screen
        return Screen.load()
    except Exception as e:  # noqa: BLE001 - optional component: the page works without it
        log.info("multi-cell screen not available (%s): multi_cell flag omitted", e)
        return None


def _model_card(clf, model_path) -> dict:
    meta = clf.meta
    metrics = meta.get("metrics")
    if metrics is None and model_path is not None:
        p = Path(model_path)
        # metrics.json beside the model (a run folder, or the bundled model's folder)
        cand = (p if p.is_dir() else p.parent) / "metrics.json"
        if cand.exists():
            try:
                metrics = json.loads(cand.read_text())
            except (OSError, ValueError):
                metrics = None
    digest = hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"architecture": meta.get("architecture"), "classes": clf.classes,
            "image_size": clf.image_size, "version": str(meta.get("version") or digest),
            "model_id": digest, "bloodcell_version": __version__,
            "review_threshold": clf.review_threshold, "temperature": clf.temperature,
            "preprocess": meta.get("preprocess"), "metrics": metrics,
            "description": meta.get("description"),
            "data": {k: v for k, v in (meta.get("data") or {}).items() if k != "root"} or None}


def _load_classifier(model, backend: str, threads: int | None):
    from .predict import Classifier
    try:  # ONNX Runtime: ~2x less CPU per image than torch; Grad-CAM still uses torch
        return Classifier.load(model, backend=backend, screen=None, threads=threads)
    except Exception as e:  # e.g. no writable cache for the export: torch still works
        if backend == "torch":
            raise
        log.warning("ONNX backend unavailable (%s); serving with torch", e)
        return Classifier.load(model, backend="torch", screen=None,
                               threads=min(threads or 1, default_threads("torch")))


# ------------------------------------------------------------------ app

def create_app(model=None, db_path: str | os.PathLike | None = None, max_upload_mb: float = 20,
               screen: Any = AUTO, max_request_mb: float | None = None, max_files: int = 1000,
               backend: str = "onnx", threads: int | None = None):
    """The FastAPI app. ``model``: a ``predict.Classifier``, a model path, or None
    for the bundled model. ``screen``: a multi-cell ``Screen``, None for none, or
    AUTO to use the installed one when present."""
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict
    from starlette.concurrency import run_in_threadpool

    from .models import resolve_model_path
    from .predict import Classifier, bundled_model_path
    if not isinstance(model, Classifier):
        # a missing model is the error to report, not an ONNX fallback warning before it
        try:
            resolve_model_path(model if model is not None else bundled_model_path())
        except FileNotFoundError as e:
            if model is None or Path(model).exists():
                raise
            raise FileNotFoundError(f"model {model} not found: no such file or folder (give a run "
                                    "folder, a model.json or a .safetensors file)") from None
    store = Store(db_path if db_path is not None else default_db_path())  # before the slow load
    try:
        clf = model if isinstance(model, Classifier) else _load_classifier(model, backend, threads)
    except BaseException:
        store.close()
        raise
    model_path = model if isinstance(model, (str, os.PathLike)) else (
        bundled_model_path() if model is None else None)
    scr = _load_screen(screen)
    clf.screen = scr  # cells are decoded, framed and screened by the Classifier's own path
    card = _model_card(clf, model_path)
    worker = ModelWorker(clf)
    limit = int(max_upload_mb * 1024 * 1024)
    request_limit = int((max_request_mb or max(200.0, 2 * max_upload_mb)) * 1024 * 1024)
    saliency_cache: OrderedDict[tuple, bytes] = OrderedDict()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()

    extra = {}
    if "max_body_size" in inspect.signature(FastAPI).parameters:  # newer FastAPI: also streamed bodies
        extra["max_body_size"] = request_limit
    app = FastAPI(title="bloodcell lab", version=__version__,
                  description="Classify peripheral blood cell images, review and correct them.",
                  docs_url=None, redoc_url=None, lifespan=lifespan, **extra)
    app.state.store, app.state.classifier, app.state.screen, app.state.worker = store, clf, scr, worker
    _add_docs(app)

    app.add_middleware(_Guard, request_limit=request_limit)
    from fastapi.exceptions import RequestValidationError
    app.add_exception_handler(RequestValidationError, _validation_error)

    # ---- model
    @app.get("/api/health", tags=["service"])
    def health():
        return {"status": "ok", "version": __version__, "model": card["architecture"],
                "model_version": card["version"], "classes": len(clf.classes),
                "multi_cell_screen": scr is not None}

    @app.get("/api/model", tags=["service"])
    def model_card():
        """Model card: classes, metrics and version of the loaded model."""
        return card

    # ---- predict
    def _prepare(datas: list[bytes], names: list[str], refused: list[str | None], sample_name: str):
        out = []
        for data, name, why in zip(datas, names, refused):
            if why:  # over the size limit: never decoded
                out.append((None, None, None, why, None))
                continue
            arrays, reason = clf._decode_safe(data)  # the one decode/frame/screen path of predict
            if arrays is None:
                out.append((None, None, None, reason, None))
                continue
            arr = arrays["model"]
            warnings = clf.check_inputs(arr[None], [arrays["source"]])[0]
            from PIL import Image
            fmt = Image.open(io.BytesIO(data)).format
            out.append((arr, arrays["screen"], _MEDIA.get(fmt), None, warnings))
        # a sample is created only when something will be stored in it
        if any(o[0] is not None for o in out):
            return out, store.sample_for_name(sample_name)
        return out, {"id": None, "name": sample_name}

    @app.post("/api/predict", tags=["predict"])
    async def predict(files: list[UploadFile] = File(..., description="one or more images"),
                      sample: str | None = Form(None, description="sample name (created if new); "
                                                "default 'default'")):
        """Classify images. Each file gets a result or an error entry (not an image,
        corrupt, over the per-file size limit, a decompression bomb: nothing is stored
        for it); the rest of the batch goes on. 413 only for too many files, or a
        request over the total size limit."""
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} files in one request; the limit is {max_files}")
        names = [_clean_name(f.filename, i) for i, f in enumerate(files)]
        too_big = f"over the {max_upload_mb:g} MB per-file limit"
        refused = [f"{f.size / 2**20:.1f} MB is {too_big}" if f.size is not None and f.size > limit
                   else None for f in files]
        datas = [b"" if why else await f.read() for f, why in zip(files, refused)]
        for i, d in enumerate(datas):
            if len(d) > limit:  # size not declared: measured
                refused[i], datas[i] = f"{len(d) / 2**20:.1f} MB is {too_big}", b""
        return JSONResponse(await _classify(datas, names, refused, sample))

    async def _classify(datas: list[bytes], names: list[str], refused: list[str | None],
                        sample: str | None) -> dict:
        """Classify and store one batch of image bytes: /api/predict's uploads and the examples."""
        sample_name = (sample or "").strip()[:200] or "default"
        prepared, sample_row = await run_in_threadpool(_prepare, datas, names, refused, sample_name)
        ok = [i for i, p in enumerate(prepared) if p[0] is not None]
        probs = np.zeros((0, len(clf.classes)))
        if ok:
            probs = await asyncio.wrap_future(worker.submit("predict", [prepared[i][0] for i in ok]))
        results: list[dict] = [{} for _ in datas]
        rows = []
        ts = _now()
        for j, i in enumerate(ok):
            rec = clf.record(names[i], probs[j], input_warnings=prepared[i][4])
            cid = secrets.token_hex(8)
            sc = prepared[i][1]
            row = {"id": cid, "sample_id": sample_row["id"], "file_name": names[i],
                   "media_type": prepared[i][2], "image": datas[i], "created": ts,
                   "model_version": card["version"], "predicted_class": rec["class"],
                   "probability": rec["probability"], "probabilities": json.dumps(rec["probabilities"]),
                   "top3": json.dumps(rec["top3"]), "needs_review": int(rec["needs_review"]),
                   "multi_cell": None if sc is None else int(bool(sc["multi_cell"])),
                   "multi_cell_score": None if sc is None else float(sc["score"]),
                   "n_regions": None if sc is None else int(sc.get("n_regions", 0)),
                   "input_warnings": json.dumps(rec["input_warnings"]),
                   "image_sha1": hashlib.sha1(datas[i]).hexdigest()}
            rows.append(row)
            res = {"file": names[i], "status": "ok", "cell_id": cid, "class": rec["class"],
                   "probability": rec["probability"], "probabilities": rec["probabilities"],
                   "top3": rec["top3"], "needs_review": rec["needs_review"],
                   "input_warnings": rec["input_warnings"]}
            if sc is not None:
                res.update(multi_cell=bool(sc["multi_cell"]), multi_cell_score=float(sc["score"]),
                           n_regions=row["n_regions"])
            results[i] = res
        for i, p in enumerate(prepared):
            if p[0] is None:
                results[i] = {"file": names[i], "status": "error", "error": f"{names[i]}: {p[3]}"}
        if rows:
            dupes = await run_in_threadpool(store.add_cells, rows)
            for k, old in dupes.items():
                i = ok[k]
                results[i] = {"file": names[i], "status": "duplicate", "cell_id": old["id"],
                              "error": f"{names[i]}: the same image is already in sample "
                                       f"'{sample_row['name']}' (as {old['file_name']}); not added again"}
        n_ok = sum(r["status"] == "ok" for r in results)
        # returned as a plain JSONResponse: JSON-ready already, skip FastAPI's re-encoding
        return {"sample_id": sample_row["id"], "sample": sample_row["name"],
                "n_ok": n_ok, "n_errors": len(datas) - n_ok, "results": results}

    @app.post("/api/examples", tags=["predict"])
    async def load_examples(sample: str | None = Form(None, description="sample name (default "
                                                     f"'{EXAMPLES_SAMPLE}')")):
        """Classify the example cells shipped with the package (16 PBC images, two
        per class, CC BY 4.0) into a demo sample, as uploads of those files would be;
        file names are ``<true class>/<original name>``. Already there: duplicates."""
        files = await run_in_threadpool(example_files)
        datas = await run_in_threadpool(lambda: [f.read_bytes() for f in files])
        names = [f"{f.parent.name}/{f.name}" for f in files]
        return JSONResponse(await _classify(datas, names, [None] * len(files),
                                            sample or EXAMPLES_SAMPLE))

    # ---- samples
    def _found(row, kind: str, key: str) -> dict:
        if row is None:
            raise HTTPException(404, f"unknown {kind} {short(key)}")
        return row

    def _sample_or_404(sid: str) -> dict:
        return _found(store.get_sample(sid), "sample", sid)

    @app.get("/api/samples", tags=["samples"])
    def samples():
        return {"samples": store.list_samples()}

    @app.get("/api/samples/{sample_id}", tags=["samples"])
    def sample_detail(sample_id: str):
        """A sample's cells and its differential count (corrected class where set)."""
        s = _sample_or_404(sample_id)
        cells = store.cells(sample_id)
        return {**s, "classes": clf.classes, "cells": cells,
                "differential": differential(cells, clf.classes)}

    @app.get("/api/samples/{sample_id}/export.csv", tags=["samples"])
    def export_csv(sample_id: str):
        """One row per cell: prediction, correction and the resulting label."""
        s = _sample_or_404(sample_id)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["cell_id", "file_name", "predicted_class", "probability", "needs_review",
                    "multi_cell", "multi_cell_score", "input_warnings", "true_class", "label",
                    "corrected_at", "created", "image_path"])
        for c in store.cells(sample_id):
            w.writerow([c["id"], csv_safe(c["file_name"]), c["predicted_class"],
                        f"{c['probability']:.4f}", int(c["needs_review"]),
                        "" if c.get("multi_cell") is None else int(c["multi_cell"]),
                        "" if c.get("multi_cell_score") is None else f"{c['multi_cell_score']:.4f}",
                        csv_safe("; ".join(c["input_warnings"])), c["true_class"] or "", c["class"],
                        c["corrected_at"] or "", c["created"], export_path(c)])
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", s["name"])[:60] or s["id"]
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})

    @app.get("/api/samples/{sample_id}/export.zip", tags=["samples"])
    def export_zip(sample_id: str, corrected_only: bool = False):
        """Images in class folders (``<label>/<cell id>.<ext>``, corrected label where
        set) plus labels.csv: a folder ``bloodcell train --data`` can read."""
        s = _sample_or_404(sample_id)
        buf = io.BytesIO()
        lines = ["cell_id,file_name,predicted_class,true_class,label,path"]
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for cls in clf.classes:  # every class folder, so the class list matches the model's
                z.writestr(f"{cls}/", b"")
            for c in store.cells(sample_id):
                if corrected_only and not c["corrected"]:
                    continue
                path = export_path(c)
                z.writestr(path, store.cell_image(c["id"])[0])
                fields = [c["id"], csv_safe(c["file_name"]), c["predicted_class"],
                          c["true_class"] or "", c["class"], path]
                lines.append(",".join('"' + str(v).replace('"', '""') + '"' for v in fields))
            z.writestr("labels.csv", "\n".join(lines) + "\n")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", s["name"])[:60] or s["id"]
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})

    # ---- cells
    def _cell_or_404(cid: str) -> dict:
        return _found(store.cell(cid), "cell", cid)

    @app.get("/api/cells/{cell_id}", tags=["cells"])
    def cell(cell_id: str):
        c = _cell_or_404(cell_id)
        return {**c, "corrections": store.corrections(cell_id)}

    class Correction(BaseModel):
        # required (null clears): a missing or misspelled key must not clear a correction
        model_config = ConfigDict(extra="forbid")
        true_class: str | None

    def _correct(cell_id: str, body: Correction):
        _cell_or_404(cell_id)
        tc = body.true_class
        if tc is not None and tc not in clf.classes:
            raise HTTPException(422, f"unknown class {short(tc)}; one of: {', '.join(clf.classes)}")
        c = store.correct(cell_id, tc)
        cells = store.cells(c["sample_id"])
        return {"cell": c, "differential": differential(cells, clf.classes)}

    @app.put("/api/cells/{cell_id}/correction", tags=["cells"])
    def put_correction(cell_id: str, body: Correction):
        """Set a cell's true class (``null`` clears it). Logged with timestamp and
        the previous prediction; returns the cell and the sample's new differential."""
        return _correct(cell_id, body)

    @app.post("/api/cells/{cell_id}/correction", tags=["cells"])
    def post_correction(cell_id: str, body: Correction):
        return _correct(cell_id, body)

    @app.get("/api/cells/{cell_id}/image", tags=["cells"])
    def cell_image(cell_id: str):
        got = store.cell_image(cell_id)
        if got is None:
            raise HTTPException(404, f"unknown cell {short(cell_id)}")
        data, mt = got
        if mt is None or len(data) > 4 * 2**20:  # not browser-viewable, or heavy: re-encode
            im = open_image(data)
            im.thumbnail((1024, 1024))
            b = io.BytesIO()
            im.save(b, "PNG")
            data, mt = b.getvalue(), "image/png"
        return Response(data, media_type=mt, headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/cells/{cell_id}/saliency", tags=["cells"])
    async def cell_saliency(cell_id: str, class_name: str | None = None):
        """Grad-CAM overlay (PNG) for the predicted class, or ``class_name``."""
        got = await run_in_threadpool(store.cell_image, cell_id)
        if got is None:
            raise HTTPException(404, f"unknown cell {short(cell_id)}")
        if class_name is not None and class_name not in clf.classes:
            raise HTTPException(422, f"unknown class {short(class_name)}")
        key = (cell_id, class_name)
        if key not in saliency_cache:
            from .saliency import gradcam, overlay_png
            arr = await run_in_threadpool(clf.preprocess, got[0])
            idx = clf.classes.index(class_name) if class_name else None
            heat, _ = await asyncio.wrap_future(worker.submit("call", gradcam, clf.model, arr, idx))
            base = await run_in_threadpool(open_image, got[0])
            saliency_cache[key] = await run_in_threadpool(overlay_png, base, heat)
            while len(saliency_cache) > 256:
                saliency_cache.popitem(last=False)
        return Response(saliency_cache[key], media_type="image/png",
                        headers={"Cache-Control": "private, max-age=86400"})

    # ---- page
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                       "style-src 'self'; script-src 'self'; object-src 'none'",
            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


JSON_LIMIT = 64 * 1024  # a correction is ~30 bytes; nothing but uploads needs more


class _Guard:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware under load): refuses a
    body over its limit (uploads: the request limit; any other body, JSON: 64 KiB) from
    its declared size before reading it, or, when no size is declared, while reading
    it; and marks every response nosniff (uploaded bytes are served back as images)."""

    def __init__(self, app, request_limit: int, json_limit: int = JSON_LIMIT):
        self.app, self.request_limit, self.json_limit = app, request_limit, json_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            headers = dict(scope["headers"])
            upload = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
            limit = self.request_limit if upload else self.json_limit
            size = headers.get(b"content-length", b"")
            if size.isdigit() and int(size) > limit:
                return await self._too_large(scope, receive, send, int(size), limit)
            if not upload:  # small by definition: read it here, counting, and hand it on
                body = await _read_body(receive, limit)
                if body is None:
                    return await self._too_large(scope, receive, send, None, limit)
                receive = _replay(body)

        async def send_nosniff(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(msg)
        await self.app(scope, receive, send_nosniff)

    @staticmethod
    async def _too_large(scope, receive, send, size: int | None, limit: int):
        from fastapi.responses import JSONResponse
        what = f"request of {size / 2**20:.1f} MB" if size is not None else "request body"
        lim = f"{limit / 2**20:g} MB" if limit >= 2**20 else f"{limit // 1024} KB"
        resp = JSONResponse({"detail": f"{what} is over the {lim} limit"}, 413)
        await resp(scope, receive, send)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it passes ``limit`` bytes."""
    chunks, n = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":  # the client went away
            return b"".join(chunks)
        chunks.append(msg.get("body", b""))
        n += len(chunks[-1])
        if n > limit:
            return None
        if not msg.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}
    return receive


def short(value, n: int = 60) -> str:
    """repr of a client's value for an error message, cut to ``n`` characters: a 30 MB
    field is named, not echoed back whole."""
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


async def _validation_error(request, exc):
    """FastAPI's 422, with each offending input cut short instead of echoed whole."""
    from fastapi.responses import JSONResponse
    errors = [{k: (short(v) if k == "input" else v) for k, v in e.items() if k != "ctx"}
              for e in exc.errors()]
    return JSONResponse({"detail": errors}, 422)


def _add_docs(app):
    """OpenAPI docs at /docs: offline from the swagger-ui-bundle package when it is
    installed, else FastAPI's default page (which loads Swagger UI from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    try:
        import swagger_ui_bundle
        from fastapi.staticfiles import StaticFiles
        app.mount("/_docs", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-static")
        urls = dict(swagger_js_url="/_docs/swagger-ui-bundle.js", swagger_css_url="/_docs/swagger-ui.css",
                    swagger_favicon_url="/_docs/favicon-32x32.png")
    except ImportError:
        urls = {}

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="bloodcell lab API", **urls)


# ------------------------------------------------------------------ CLI

def default_threads(backend: str = "onnx") -> int:
    """Inference threads. ONNX Runtime (spinning off) uses every core and yields them
    to decoding and HTTP between batches: on 2 cores, 50 clients got p95 400 ms with
    two threads vs 480-570 ms with one (benchmarks/serve_load.py). PyTorch's OpenMP
    threads wait for a core on a busy box (a tiny batch-1 forward ran 200x slower
    with two threads on 2 cores), so torch gets half the cores."""
    cores = os.cpu_count() or 2
    return max(1, min(4, cores if backend != "torch" else cores // 2))


def serve(host: str = "127.0.0.1", port: int = 8000, model=None, db_path=None, max_upload_mb=20,
          threads: int | None = None, log_level: str = "info", screen: Any = AUTO,
          backend: str = "onnx"):
    import torch
    import uvicorn
    threads = threads or default_threads(backend)
    torch.set_num_threads(threads if backend == "torch" else default_threads("torch"))
    if screen not in (None, AUTO) and isinstance(screen, (str, os.PathLike)):
        from .screen import Screen
        screen = Screen.load(screen)
    app = create_app(model=model, db_path=db_path, max_upload_mb=max_upload_mb, screen=screen,
                     backend=backend, threads=threads)
    db = db_path or default_db_path()
    print(f"bloodcell lab page on http://{host}:{port}/  (API docs /docs, database {db})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def cmd_serve(args):
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can see and change "
                    "the data (there is no login)", args.host)
    screen = None if args.no_screen else (args.screen or AUTO)
    serve(args.host, args.port, args.model, args.db, args.max_upload_mb, args.threads, args.log_level,
          screen, args.backend)


def add_cli(sub):
    from .cli import ranged
    from .predict import BACKENDS
    p = sub.add_parser("serve", help="local review page and HTTP API (http://127.0.0.1:8000/)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=ranged(int, 1, 65535), default=8000, help="TCP port, 1-65535 (default 8000)")
    p.add_argument("--model", help="run folder or model file (default: the bundled model)")
    p.add_argument("--db", help=f"SQLite database (default {default_db_path()}, or $BLOODCELL_DB)")
    p.add_argument("--max-upload-mb", type=ranged(float, 0, lo_open=True), default=20,
                   help="per-file upload limit (default 20)")
    p.add_argument("--threads", type=ranged(int, 1, 4), help="inference threads (default: onnx every core, torch half the cores; 1 to 4)")
    p.add_argument("--screen", help="multi-cell screen file (default: the bundled one, if any)")
    p.add_argument("--no-screen", action="store_true", help="no multi-cell flag")
    p.add_argument("--backend", default="onnx", choices=BACKENDS,
                   help="inference engine (default onnx; saliency always uses torch)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (info logs every request)")
    p.set_defaults(func=cmd_serve)
