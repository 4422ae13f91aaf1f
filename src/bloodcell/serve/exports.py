"""A sample's exports: CSV (one row per cell) and a ZIP of images in class folders
that ``bloodcell train --data`` reads. File names come from the client: they are
written as text (formula-guarded in CSV), never used as paths."""
from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path

from ..data import IMAGE_EXTENSIONS, csv_safe

_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}
CSV_COLUMNS = ["cell_id", "file_name", "predicted_class", "probability", "needs_review", "multi_cell",
               "multi_cell_score", "input_warnings", "true_class", "label", "corrected_at", "created",
               "image_path", "model", "model_version"]  # last two: which model answered (predict's CSV too)


def export_path(cell: dict) -> str:
    """``<label>/<cell id>.<ext>`` in the ZIP export (and named so in the CSV export). The
    extension is one `bloodcell train --data` reads: from the stored media type, else
    the uploaded name's (TIFF, BMP), else png; images are opened by content anyway."""
    ext = _EXT.get(cell.get("media_type") or "")
    if ext is None:
        suffix = Path(cell["file_name"]).suffix.lower()
        ext = suffix[1:] if suffix in IMAGE_EXTENSIONS else "png"
    return f"{cell['class']}/{cell['id']}.{ext}"


def download_name(sample: dict, ext: str) -> str:
    """A safe file name for the browser's download, from the sample's name."""
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", sample["name"])[:60] or sample["id"]) + "." + ext


def sample_csv(cells: list[dict]) -> str:
    """One row per cell: prediction, correction and the resulting label."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for c in cells:
        w.writerow([c["id"], csv_safe(c["file_name"]), c["predicted_class"],
                    f"{c['probability']:.4f}", int(c["needs_review"]),
                    "" if c.get("multi_cell") is None else int(c["multi_cell"]),
                    "" if c.get("multi_cell_score") is None else f"{c['multi_cell_score']:.4f}",
                    csv_safe("; ".join(c["input_warnings"])), c["true_class"] or "", c["class"],
                    c["corrected_at"] or "", c["created"], export_path(c), _model(c),
                    csv_safe(c.get("model_version") or "")])
    return buf.getvalue()


def _model(cell: dict) -> str:
    return cell.get("model", "main")  # store._cell_json marks the other-labs model's answers


def sample_zip(cells: list[dict], classes: list[str], image_of, corrected_only: bool = False) -> bytes:
    """Images in class folders (``<label>/<cell id>.<ext>``, corrected label where set)
    plus labels.csv. ``image_of(cell id)`` -> the stored bytes."""
    buf = io.BytesIO()
    lines = io.StringIO("cell_id,file_name,predicted_class,true_class,label,path,model\n")
    lines.seek(0, io.SEEK_END)
    w = csv.writer(lines, quoting=csv.QUOTE_ALL, lineterminator="\n")
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for cls in classes:  # every class folder, so the class list matches the model's
            z.writestr(f"{cls}/", b"")
        for c in cells:
            if corrected_only and not c["corrected"]:
                continue
            path = export_path(c)
            z.writestr(path, image_of(c["id"]))
            w.writerow([c["id"], csv_safe(c["file_name"]), c["predicted_class"],
                        c["true_class"] or "", c["class"], path, _model(c)])
        z.writestr("labels.csv", lines.getvalue())
    return buf.getvalue()
