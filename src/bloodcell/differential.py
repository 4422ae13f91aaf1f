"""The differential count of a lab report, from classified cells: count, % and its
95 % Wilson interval per class, the white-cell differential (each leukocyte class as
% of the white cells, nucleated red cells per 100 white cells, platelets apart), and
which cells are left out until reviewed. Shared by ``bloodcell predict`` and the lab
page (``bloodcell serve``); the page's JavaScript mirrors ``proportion_ci`` and
``leukocyte_differential``."""
from __future__ import annotations

from typing import Sequence


def proportion_ci(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of the proportion k/n. A differential count is a
    sample: on 100 cells a 5 % class may truly be anywhere in 2.2-11.2 % (Ruemke's
    table makes the same point); the interval says how much to trust each %."""
    if n <= 0:
        return 0.0, 0.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


WHITE_CELLS = ("basophil", "eosinophil", "ig", "lymphocyte", "monocyte", "neutrophil")


def leukocyte_differential(counts: dict[str, int]) -> dict | None:
    """The white-cell differential of a lab report: each leukocyte class as % of the
    white cells, nucleated red cells (erythroblasts) per 100 white cells, platelets
    apart. None for a model without those class names."""
    white = [c for c in WHITE_CELLS if c in counts]
    if not white:
        return None
    n = sum(counts[c] for c in white)
    out = {"n_white": n, "percent": {c: (100.0 * counts[c] / n if n else 0.0) for c in white},
           "ci95_percent": {c: [100.0 * v for v in proportion_ci(counts[c], n)] for c in white}}
    if "erythroblast" in counts:
        out["nrbc_per_100_wbc"] = 100.0 * counts["erythroblast"] / n if n else None
    if "platelet" in counts:
        out["n_platelet"] = counts["platelet"]
    return out


def class_shares(counts: dict[str, int]) -> dict:
    """Per class: % of all counted, its 95 % interval; and the white-cell differential."""
    n = sum(counts.values())
    return {"percent": {c: (100.0 * k / n if n else 0.0) for c, k in counts.items()},
            "ci95_percent": {c: [100.0 * v for v in proportion_ci(k, n)] for c, k in counts.items()},
            "white_cells": leukocyte_differential(counts)}


def is_flagged(rec: dict) -> bool:
    """Multi-cell, or unlike the training images: its class is not counted unasked."""
    return bool(rec.get("multi_cell")) or bool(rec.get("input_warnings"))


def differential_count(records: Sequence[dict], classes: Sequence[str],
                       include_flagged: bool = False) -> dict:
    """Count and % per class over the ``ok`` records, as a lab report gives it.
    Images the multi-cell screen flagged, and images with input warnings (not like
    the training images), are left out unless ``include_flagged``."""
    ok = [r for r in records if r.get("status") == "ok"]
    flagged = [r for r in ok if r.get("multi_cell")]
    unusual = [r for r in ok if r.get("input_warnings")]
    counted = ok if include_flagged else [r for r in ok if not is_flagged(r)]
    counts = {c: 0 for c in classes}
    for r in counted:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    n = len(counted)
    return {"n_counted": n, "n_ok": len(ok), "n_multi_cell": len(flagged),
            "n_input_warnings": len(unusual), "flagged_included": include_flagged,
            "n_needs_review": sum(bool(r.get("needs_review")) for r in counted),
            "counts": counts, **class_shares(counts)}


def review_counts(records: Sequence[dict], threshold: float, other_labs_threshold: float | None = None) -> dict:
    """Why the classified images need review (an image can have both reasons). Records
    the other-labs model answered are held to its own threshold."""
    ok = [r for r in records if r.get("status") == "ok"]
    routed = [other_labs_threshold is not None and r.get("model") == "other-labs" for r in ok]
    low = [r.get("review_probability", r["probability"]) < (other_labs_threshold if o else threshold)
           for r, o in zip(ok, routed)]
    return {"n_needs_review": sum(bool(r.get("needs_review")) for r in ok),
            "n_low_confidence": sum(low),
            **({"n_low_confidence_other_labs": sum(x and o for x, o in zip(low, routed))}
               if other_labs_threshold is not None else {}),
            "n_input_warnings": sum(bool(r.get("input_warnings")) for r in ok)}

