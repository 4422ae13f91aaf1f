"""``bloodcell predict``'s job over a ``Classifier``: files, folders and globs ->
records in input order, a differential count and CSV/JSON written atomically;
resumable through a journal next to the output (a killed run loses at most the
batch in flight)."""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .differential import differential_count, review_counts
from .decoding import use_processes
from .predict import Classifier, default_workers

log = logging.getLogger("bloodcell")

JOURNAL_VERSION = 2  # 2: records carry input_warnings


# ----------------------------------------------------------------------------- inputs

_GLOB_CHARS = set("*?[")


def expand_inputs(specs: Sequence[str]) -> list[tuple[str, str | None]]:
    """Files, folders (recursive) and globs -> [(path, skip reason or None)], in a stable
    order, each path once. Folders skip hidden files and non-image extensions (listed
    with the reason); a path that does not exist is reported, not fatal."""
    from .data import iter_image_files
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    def add(p, why=None):
        key = os.path.realpath(p)  # a link and its target are the same cell: classify it once
        if key not in seen:
            seen.add(key)
            out.append((str(p), why))

    def add_path(p: Path):
        if p.is_dir():
            for f, why in iter_image_files(p):
                add(f, why)
        else:
            add(p)

    for spec in specs:
        p = Path(spec)
        if p.exists():
            add_path(p)
        elif _GLOB_CHARS & set(spec):
            hits = sorted(glob.glob(spec, recursive=True))
            if not hits:
                add(spec, "no such file (the pattern matched nothing)")
            for h in hits:
                add_path(Path(h))
        elif os.path.islink(spec):
            add(spec, "broken link (its target does not exist)")
        else:
            add(spec, "no such file or folder")
    return out


def _file_key(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


# ----------------------------------------------------------------------------- journal

def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def read_journal(path: Path, fingerprint: dict) -> dict[tuple, dict]:
    """Finished records of an interrupted run, by file key; empty when the journal
    was made with another model/threshold/screen (those records would be stale)."""
    if not path.exists():
        return {}
    done: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        return {}
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        head = {}
    if head.get("journal") != JOURNAL_VERSION or head.get("fingerprint") != fingerprint:
        log.warning("%s was made with another model or settings: starting over", path)
        return {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the run was killed
            continue
        key = rec.pop("_key", None)
        if key:
            done[tuple(key)] = rec
    return done


class Journal:
    """Append-only JSON lines: a header with the fingerprint, then one record per image.
    Flushed per batch, so a killed run loses at most the batch in flight."""

    def __init__(self, path: Path, fingerprint: dict, fresh: bool):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w" if fresh else "a", encoding="utf-8")
        if fresh:
            self.f.write(json.dumps({"journal": JOURNAL_VERSION, "fingerprint": fingerprint}) + "\n")
            self.f.flush()

    def add(self, key, rec):
        if key is not None:
            self.f.write(json.dumps({**rec, "_key": key}) + "\n")

    def sync(self):
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        if not self.f.closed:
            self.f.close()


# ----------------------------------------------------------------------------- outputs

def flat_record(r: dict, classes: Sequence[str]) -> dict:
    """One record as the flat columns of the CSV/Parquet outputs (None where not applicable)."""
    ok = r.get("status") == "ok"
    probs = r.get("probabilities", {})
    return {"path": r["path"], "status": r["status"], "class": r.get("class"),
            "probability": r["probability"] if ok else None,
            "top3": "; ".join(f"{t['class']} {t['probability']:.4f}" for t in r.get("top3", [])),
            "needs_review": r.get("needs_review") if ok else None,
            "multi_cell": r.get("multi_cell"), "multi_cell_score": r.get("multi_cell_score"),
            "input_warnings": "; ".join(r.get("input_warnings", [])),
            **{f"p_{c}": (probs[c] if ok else None) for c in classes},
            **({"model": r["model"]} if "model" in r else {})}


def flat_records(records: Sequence[dict], classes: Sequence[str], summary: dict | None = None) -> list[dict]:
    """:func:`flat_record` for a run, one set of columns for all: "model" (which model
    answered) only in runs with an other-labs model (the summary names one), last, so
    the other columns stay put. No records: one row of the header's empty values."""
    rows = [flat_record(r, classes) for r in records] or [
        {k: None for k in flat_record({"path": "", "status": ""}, classes)}]
    if any("model" in r for r in rows) or (summary or {}).get("other_labs_model_sha1"):
        for r in rows:
            r.setdefault("model", None)
    return rows


def write_results(out: Path, records: list[dict], classes: list[str], summary: dict) -> None:
    """``.csv``: one row per input (summary goes to the console); ``.json``: summary + records."""
    import csv
    import io

    from .data import atomic_write_json, atomic_write_text, csv_safe
    if out.suffix.lower() == ".json":
        atomic_write_json(out, {"summary": summary, "results": records})
        return
    text_cols = ("path", "status", "input_warnings")  # free text: guarded against formulas
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    rows = flat_records(records, classes, summary)
    w.writerow(list(rows[0]))
    for row in rows if records else ():
        w.writerow(["" if v is None else csv_safe(v) if k in text_cols else
                    f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()])
    atomic_write_text(out, buf.getvalue())


def check_out_path(out, parquet: bool = False) -> Path | None:
    """``--out`` checked before any work; ``parquet``: the engine can also write .parquet."""
    if out is None:
        return None
    out = Path(out)
    kinds = (".csv", ".json", ".parquet") if parquet else (".csv", ".json")
    if out.suffix.lower() not in kinds:
        raise ValueError(f"--out {out}: use a {', '.join(kinds[:-1])} or {kinds[-1]} file name")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name")
    # fail now, not after classifying a big folder: the results and the journal go here
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out {out}: its folder {out.parent} is not writable")
    if out.exists():
        # an existing file that cannot be replaced (read-only, immutable): opening it for
        # update, without changing it, fails now instead of after the last image
        try:
            if not os.access(out, os.W_OK):
                raise PermissionError(13, "permission denied")
            with open(out, "r+b"):
                pass
        except OSError as e:
            raise ValueError(f"--out {out}: the existing file cannot be replaced "
                             f"({e.strerror or e}); remove it or choose another name") from None
    return out


def run_summary(clf: Classifier, records: list[dict], seconds: float, n_computed: int,
                batch_size: int, workers: int, include_flagged: bool = False, n_resumed: int = 0,
                fingerprint: dict | None = None, engine: str = "local", decode: str | None = None) -> dict:
    """The summary of a predict run (either engine): provenance, differential, skips, speed."""
    from datetime import datetime, timezone

    from . import __version__
    fp = fingerprint or clf.fingerprint()
    skipped = [{"path": r["path"], "reason": r["status"].split(": ", 1)[1]}
               for r in records if r["status"] != "ok"]
    return {
        # which software and which weights made these results, for a lab's records
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bloodcell_version": __version__,
        "model": str(clf.weights_path) if clf.weights_path else None,
        "model_sha1": fp["weights_sha1"],
        "engine": engine, "backend": clf.backend, "batch_size": batch_size, "workers": workers,
        **({"decode": decode} if decode else {}),
        "review_threshold": clf.review_threshold, "temperature": clf.temperature,
        "multi_cell_screen": clf.screen is not None,
        **({"other_labs_model": str(clf.fallback.weights_path) if clf.fallback.weights_path else None,
            "other_labs_model_sha1": fp["fallback"]["weights_sha1"],
            "other_labs_review_threshold": clf.fallback.review_threshold,
            "n_other_labs": sum(r.get("model") == "other-labs" for r in records)}
           if clf.fallback is not None else {}),
        "n_inputs": len(records), "n_ok": sum(r["status"] == "ok" for r in records),
        "n_skipped": len(skipped), "n_resumed": n_resumed, "n_computed": n_computed,
        "seconds": round(seconds, 3), "images_per_s": n_computed / seconds if seconds > 0 else 0.0,
        "differential": differential_count(records, clf.classes, include_flagged),
        "review": review_counts(records, clf.review_threshold,
                                clf.fallback.review_threshold if clf.fallback is not None else None),
        "skipped": skipped,
    }


def _finish(out: Path, records: list[dict], classes: list[str], summary: dict) -> None:
    """Write the results, then drop the journal. A write failing here (the path changed since
    check_out_path) names the file and keeps the journal, so a rerun resumes."""
    try:
        write_results(out, records, classes, summary)
    except OSError as e:
        raise OSError(f"--out {out}: cannot write the results ({e.strerror or e}); the finished "
                      f"images are kept in {journal_path(out)}: fix the path and run the same "
                      f"command again to resume") from None
    journal_path(out).unlink(missing_ok=True)


def predict_paths(clf: Classifier, specs: Sequence[str], out=None, batch_size: int = 64,
                  workers: int | None = None, include_flagged: bool = False,
                  progress: bool = True, resume: bool = True,
                  decode: str = "auto") -> tuple[list[dict], dict]:
    """Classify every image under ``specs`` -> (records in input order, summary).
    ``decode``: "threads", "processes" or "auto" (worker processes for big jobs:
    ``decoding.use_processes``).

    With ``out``, finished records go to a journal (``<out>.partial.jsonl``) as
    they come; a rerun after an interruption reuses those whose file (path, size,
    mtime) is unchanged, and the final file is written atomically, after which
    the journal is removed."""
    from tqdm import tqdm
    out = check_out_path(out)
    workers = default_workers() if workers is None else workers
    items = expand_inputs(specs)
    records: list[dict | None] = [None] * len(items)
    keys = [_file_key(p) if why is None else None for p, why in items]
    for i, (p, why) in enumerate(items):
        if why is not None:
            records[i] = {"path": p, "status": f"skipped: {why}"}
    journal = None
    n_resumed = 0
    fp = clf.fingerprint()  # hashes the weights: once per run (journal + provenance)
    if out is not None:
        jp = journal_path(out)
        old = read_journal(jp, fp) if resume else {}
        for i, k in enumerate(keys):
            if k is not None and tuple(k) in old:  # the same file, named as in this command
                records[i] = {**old[tuple(k)], "path": items[i][0]}
                n_resumed += 1
        if n_resumed:
            log.info("resuming: %d image(s) already done in %s", n_resumed, jp)
        journal = Journal(jp, fp, fresh=not old)
    todo = [i for i, r in enumerate(records) if r is None]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="classifying",
               disable=not progress, mininterval=0.5, file=sys.stderr)
    processes = use_processes(decode, len(todo), workers)
    t0 = time.perf_counter()
    try:
        for batch in clf.iter_predict((items[i][0] for i in todo), names=(items[i][0] for i in todo),
                                      batch_size=batch_size, workers=workers, processes=processes):
            for j, rec in batch:
                i = todo[j]
                records[i] = rec
                if journal:
                    journal.add(keys[i], rec)
            if journal:
                journal.sync()
            bar.update(len(batch))
    except KeyboardInterrupt:
        if journal:
            log.warning("interrupted: finished images are kept in %s; run the same command again "
                        "to resume without recomputing them", journal.path)
        raise
    finally:
        bar.close()
        if journal:
            journal.close()
    summary = run_summary(clf, records, seconds=time.perf_counter() - t0,
                          n_computed=sum(1 for i in todo if records[i].get("status") == "ok"),
                          batch_size=batch_size, workers=workers, include_flagged=include_flagged,
                          n_resumed=n_resumed, fingerprint=fp, decode="processes" if processes else "threads")
    if out is not None:
        _finish(out, records, clf.classes, summary)
    return records, summary
