"""From uploaded bytes to stored cells: each image goes through the Classifier's
own decode -> framing -> multi-cell screen -> input-check path (``Classifier.decode_safe`` and
``check_inputs``, as ``bloodcell predict``), then becomes a database row and an
API result. Also the sample's differential count, as the page shows it."""
from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
from dataclasses import dataclass, field

import numpy as np

from ..differential import class_shares, is_flagged

_MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


def clean_name(name: str | None, i: int) -> str:
    """A display name: control characters dropped, length capped. Never a path."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", name or "")[-255:]
    return name or f"file {i + 1}"


def media_type(data: bytes) -> str | None:
    """The browser media type of an image's bytes (None: TIFF, BMP..., re-encoded when shown)."""
    from PIL import Image
    try:
        return _MEDIA.get(Image.open(io.BytesIO(data)).format)
    except Exception:  # noqa: BLE001 - decoded already; only the label is missing
        return None


@dataclass
class PreparedCell:
    """One uploaded file, decoded and checked, ready for the model (or why not)."""
    name: str
    data: bytes
    error: str | None = None               # why it is not classified; None = ok
    arrays: dict = field(default_factory=dict)  # Classifier.decode_safe's: model, source, screen...
    media_type: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def prepare_cells(clf, datas: list[bytes], names: list[str], refused: list[str | None]) -> list[PreparedCell]:
    """Decode, screen and check each file (runs in a worker thread, not on the model's)."""
    cells = []
    for data, name, why in zip(datas, names, refused):
        if why:  # over the size limit: never decoded
            cells.append(PreparedCell(name, b"", error=why))
            continue
        arrays, why = clf.decode_safe(data)
        cells.append(PreparedCell(name, data, error=why) if arrays is None else
                     PreparedCell(name, data, arrays=arrays, media_type=media_type(data)))
    ok = [c for c in cells if c.ok]
    if ok:
        batch = np.stack([c.arrays["model"] for c in ok])
        for c, w in zip(ok, clf.check_inputs(batch, [c.arrays["source"] for c in ok])):
            c.warnings = w
    return cells


def new_cell(clf, cell: PreparedCell, probs: np.ndarray, sample_id: str, card: dict,
             created: str, review: float | None = None) -> tuple[dict, dict]:
    """-> (the database row, the API result) of a classified cell. ``card``: the app's
    model card (the version of the model that answered goes into the row); ``review``:
    its review probability (``Classifier.review_scores``) when the app looks at 4 views."""
    sc = cell.arrays.get("screen")
    rec = clf.record(cell.name, probs, sc, cell.warnings, decoded=cell.arrays, review=review)
    model_version = (f"other-labs:{card['other_labs_model']['version']}" if rec.get("model") == "other-labs"
                     else card["version"])
    cid = secrets.token_hex(8)
    row = {"id": cid, "sample_id": sample_id, "file_name": cell.name, "media_type": cell.media_type,
           "image": cell.data, "created": created, "model_version": model_version,
           "predicted_class": rec["class"], "probability": rec["probability"],
           "probabilities": json.dumps(rec["probabilities"]), "top3": json.dumps(rec["top3"]),
           "needs_review": int(rec["needs_review"]),
           "multi_cell": None if sc is None else int(bool(sc["multi_cell"])),
           "multi_cell_score": None if sc is None else float(sc["score"]),
           "n_regions": None if sc is None else int(sc.get("n_regions", 0)),
           "input_warnings": json.dumps(rec["input_warnings"]),
           "image_sha1": hashlib.sha1(cell.data).hexdigest()}
    res = {"file": cell.name, "status": "ok", "cell_id": cid,
           **{k: rec[k] for k in ("class", "probability", "probabilities", "top3", "needs_review",
                                  "input_warnings", "multi_cell", "multi_cell_score", "model") if k in rec}}
    if sc is not None:
        res["n_regions"] = row["n_regions"]
    return row, res


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
