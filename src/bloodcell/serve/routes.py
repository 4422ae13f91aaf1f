"""The HTTP API and the page, on one ``APIRouter``; each route takes what it needs
(the database, the classifier, the model thread) from ``app.state.lab``."""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime
import asyncio
import io
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..predict import example_files
from ..transforms import open_image
from . import EXAMPLES_SAMPLE, exports
from .cells import clean_name, differential, new_cell, prepare_cells
from .config import Lab
from .store import now

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'")
router = APIRouter()


def lab(request: Request) -> Lab:
    return request.app.state.lab


def short(value, n: int = 60) -> str:
    """repr of a client's value for an error message, cut to ``n`` characters: a 30 MB
    field is named, not echoed back whole."""
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def _found(row, kind: str, key: str) -> dict:
    if row is None:
        raise HTTPException(404, f"unknown {kind} {short(key)}")
    return row


# ---- service

@router.get("/api/health", tags=["service"])
def health(L: Lab = Depends(lab)):
    return {"status": "ok", "version": __version__, "model": L.card["architecture"],
            "model_version": L.card["version"], "classes": len(L.clf.classes),
            "backend": L.clf.backend,  # onnx unless it fell back to torch (logged)
            "multi_cell_screen": L.clf.screen is not None}


@router.get("/api/model", tags=["service"])
def model_card(L: Lab = Depends(lab)):
    """Model card: classes, metrics and version of the loaded model."""
    return L.card


# ---- predict

async def classify(L: Lab, datas: list[bytes], names: list[str], refused: list, sample: str | None) -> dict:
    """Classify and store one batch of image bytes; each file gets a result or an error."""
    sample_name = (sample or "").strip()[:200] or "default"
    cells = await run_in_threadpool(prepare_cells, L.clf, datas, names, refused)
    ok = [i for i, c in enumerate(cells) if c.ok]
    results = [{"file": c.name, "status": "error", "error": f"{c.name}: {c.error}"} for c in cells]
    if not ok:  # a sample is created only when something is stored in it
        return {"sample_id": None, "sample": sample_name, "n_ok": 0, "n_errors": len(cells),
                "results": results}
    sample_row = await run_in_threadpool(L.store.sample_for_name, sample_name)
    probs, review = await asyncio.wrap_future(L.worker.predict([cells[i].arrays for i in ok]))
    ts, rows = now(), []
    for i, p, r in zip(ok, probs, [None] * len(ok) if review is None else review):
        row, results[i] = new_cell(L.clf, cells[i], p, sample_row["id"], L.card, ts, r)
        rows.append(row)
    dupes = await run_in_threadpool(L.store.add_cells, rows)
    for k, old in dupes.items():
        name = rows[k]["file_name"]
        results[ok[k]] = {"file": name, "status": "duplicate", "cell_id": old["id"],
                             "error": f"{name}: the same image is already in sample "
                                      f"'{sample_row['name']}' (as {old['file_name']}); not added again"}
    n_ok = sum(r["status"] == "ok" for r in results)
    return {"sample_id": sample_row["id"], "sample": sample_row["name"], "n_ok": n_ok,
            "n_errors": len(cells) - n_ok, "results": results}


@router.post("/api/predict", tags=["predict"])
async def predict(files: list[UploadFile] = File(..., description="one or more images"),
                  sample: str | None = Form(None, description="sample name (created if new); "
                                            "default 'default'"),
                  L: Lab = Depends(lab)):
    """Classify images. Each file gets a result or an error entry (not an image,
    corrupt, over the per-file size limit, a decompression bomb: nothing is stored
    for it); the rest of the batch goes on. 413 only for too many files, or a
    request over the total size limit."""
    cfg = L.config
    if len(files) > cfg.max_files:
        raise HTTPException(413, f"{len(files)} files in one request; the limit is {cfg.max_files}")
    names = [clean_name(f.filename, i) for i, f in enumerate(files)]
    too_big = f"over the {cfg.max_upload_mb:g} MB per-file limit"
    refused = [f"{f.size / 2**20:.1f} MB is {too_big}" if f.size is not None and f.size > cfg.upload_limit
               else None for f in files]
    datas = [b"" if why else await f.read() for f, why in zip(files, refused)]
    for i, d in enumerate(datas):
        if len(d) > cfg.upload_limit:  # size not declared: measured
            refused[i], datas[i] = f"{len(d) / 2**20:.1f} MB is {too_big}", b""
    # plain JSONResponse: the results are JSON-ready already, skip FastAPI's re-encoding
    return JSONResponse(await classify(L, datas, names, refused, sample))


@router.post("/api/examples", tags=["predict"])
async def load_examples(sample: str | None = Form(None, description="sample name (default "
                                                 f"'{EXAMPLES_SAMPLE}')"), L: Lab = Depends(lab)):
    """Classify the example cells shipped with the package (16 PBC images, two
    per class, CC BY 4.0) into a demo sample, as uploads of those files would be;
    file names are ``<true class>/<original name>``. Already there: duplicates."""
    files = await run_in_threadpool(example_files)
    datas = await run_in_threadpool(lambda: [f.read_bytes() for f in files])
    names = [f"{f.parent.name}/{f.name}" for f in files]
    return JSONResponse(await classify(L, datas, names, [None] * len(files), sample or EXAMPLES_SAMPLE))


# ---- samples

@router.get("/api/samples", tags=["samples"])
def samples(L: Lab = Depends(lab)):
    return {"samples": L.store.list_samples()}


@router.get("/api/samples/{sample_id}", tags=["samples"])
def sample_detail(sample_id: str, L: Lab = Depends(lab)):
    """A sample's cells and its differential count (corrected class where set)."""
    s = _found(L.store.get_sample(sample_id), "sample", sample_id)
    cells = L.store.cells(sample_id)
    return {**s, "classes": L.clf.classes, "cells": cells,
            "differential": differential(cells, L.clf.classes)}


@router.get("/api/samples/{sample_id}/export.csv", tags=["samples"])
def export_csv(sample_id: str, L: Lab = Depends(lab)):
    """One row per cell: prediction, correction and the resulting label."""
    s = _found(L.store.get_sample(sample_id), "sample", sample_id)
    return Response(exports.sample_csv(L.store.cells(sample_id)), media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="{exports.download_name(s, "csv")}"'})


@router.get("/api/samples/{sample_id}/export.zip", tags=["samples"])
def export_zip(sample_id: str, corrected_only: bool = False, L: Lab = Depends(lab)):
    """Images in class folders (``<label>/<cell id>.<ext>``, corrected label where
    set) plus labels.csv: a folder ``bloodcell train --data`` can read."""
    s = _found(L.store.get_sample(sample_id), "sample", sample_id)
    data = exports.sample_zip(L.store.cells(sample_id), L.clf.classes,
                              lambda cid: L.store.cell_image(cid)[0], corrected_only)
    return Response(data, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{exports.download_name(s, "zip")}"'})


# ---- cells

@router.get("/api/cells/{cell_id}", tags=["cells"])
def cell(cell_id: str, L: Lab = Depends(lab)):
    c = _found(L.store.cell(cell_id), "cell", cell_id)
    return {**c, "corrections": L.store.corrections(cell_id)}


class Correction(BaseModel):
    # required (null clears): a missing or misspelled key must not clear a correction
    model_config = ConfigDict(extra="forbid")
    true_class: str | None


def _correct(L: Lab, cell_id: str, body: Correction) -> dict:
    _found(L.store.cell(cell_id), "cell", cell_id)
    tc = body.true_class
    if tc is not None and tc not in L.clf.classes:
        raise HTTPException(422, f"unknown class {short(tc)}; one of: {', '.join(L.clf.classes)}")
    c = L.store.correct(cell_id, tc)
    return {"cell": c, "differential": differential(L.store.cells(c["sample_id"]), L.clf.classes)}


@router.put("/api/cells/{cell_id}/correction", tags=["cells"])
def put_correction(cell_id: str, body: Correction, L: Lab = Depends(lab)):
    """Set a cell's true class (``null`` clears it). Logged with timestamp and
    the previous prediction; returns the cell and the sample's new differential."""
    return _correct(L, cell_id, body)


@router.post("/api/cells/{cell_id}/correction", tags=["cells"])
def post_correction(cell_id: str, body: Correction, L: Lab = Depends(lab)):
    return _correct(L, cell_id, body)


@router.get("/api/cells/{cell_id}/image", tags=["cells"])
def cell_image(cell_id: str, L: Lab = Depends(lab)):
    data, mt = _found(L.store.cell_image(cell_id), "cell", cell_id)
    if mt is None or len(data) > 4 * 2**20:  # not browser-viewable, or heavy: re-encode
        im = open_image(data)
        im.thumbnail((1024, 1024))
        b = io.BytesIO()
        im.save(b, "PNG")
        data, mt = b.getvalue(), "image/png"
    return Response(data, media_type=mt, headers={"Cache-Control": "private, max-age=86400"})


@router.get("/api/cells/{cell_id}/saliency", tags=["cells"])
async def cell_saliency(cell_id: str, class_name: str | None = None, L: Lab = Depends(lab)):
    """Grad-CAM overlay (PNG) for the predicted class, or ``class_name``."""
    data, _ = _found(await run_in_threadpool(L.store.cell_image, cell_id), "cell", cell_id)
    if class_name is not None and class_name not in L.clf.classes:
        raise HTTPException(422, f"unknown class {short(class_name)}")
    key = (cell_id, class_name)
    if key not in L.saliency_cache:
        from ..saliency import gradcam, overlay_png  # torch: only when asked for
        # the model that answered (main or other-labs), on the input as it saw it
        who, arr = await run_in_threadpool(L.clf.answering, data)
        idx = L.clf.classes.index(class_name) if class_name else None
        heat, _ = await asyncio.wrap_future(L.worker.call(gradcam, who.model, arr, idx))
        base = await run_in_threadpool(open_image, data)
        L.saliency_cache[key] = await run_in_threadpool(overlay_png, base, heat)
        while len(L.saliency_cache) > 256:
            L.saliency_cache.popitem(last=False)
    return Response(L.saliency_cache[key], media_type="image/png",
                    headers={"Cache-Control": "private, max-age=86400"})


# ---- page

@router.get("/", include_in_schema=False)
def index():
    return FileResponse(STATIC_DIR / "index.html",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
