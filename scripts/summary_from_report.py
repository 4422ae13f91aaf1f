"""summary.json for a study report written before reports carried one (`bloodcell report
--compare` reads it). Reads the report's own tables: "How it was run" (px, epochs, stop)
and "Accuracy of the six generations" (train/val/test, CI, macro F1).

    python scripts/summary_from_report.py docs/study-capped
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (header first, separator row dropped)."""
    out, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            out.append(cur)
            cur = []
    return out


def _find(ts, first_col: str, has: str):
    return next(t for t in ts if t[0][0] == first_col and has in t[0])


def _pct(cell: str) -> float:
    return round(float(cell.rstrip(" %")) / 100, 4)


def summary(md: str) -> list[dict]:
    ts = tables(md)
    runs = {r[0]: r for r in _find(ts, "generation", "epochs run / max")[1:]}
    rows = []
    for r in _find(ts, "generation", "test 95 % CI")[1:]:
        gen, model = re.fullmatch(r"Gen (\d+): (\S+)", r[0]).groups()
        run = runs[r[0]]
        done, cap = (int(x) for x in run[2].split("/"))
        lo, hi = (float(x) / 100 for x in r[4].split("–"))
        rows.append({"model": model, "generation": int(gen), "image_size": int(run[1]),
                     "epochs_run": done, "epochs_max": cap,
                     "stopped_by": "early stop" if run[4].startswith("early") else "epoch cap",
                     "accuracy": {"train": _pct(r[1]), "val": _pct(r[2]), "test": _pct(r[3])},
                     "test_ci95": [round(lo, 4), round(hi, 4)], "test_macro_f1": float(r[5])})
    return rows


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    rows = summary((folder / "report.md").read_text())
    (folder / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{folder / 'summary.json'}: {len(rows)} generations")
