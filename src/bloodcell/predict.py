"""Prediction API: ``Classifier.load()`` (bundled model, or a path) and
``clf.predict(inputs)`` -> one record per input, never raising on a bad one;
plus ``bloodcell predict`` (files, folders, globs -> CSV/JSON + a differential
count), resumable through a journal next to the output.

Uses ``transforms.preprocess`` -- the same definition training used. Decoding
runs in a thread pool ahead of the model (PIL releases the GIL while decoding
and resizing; ONNX Runtime and PyTorch release it while computing), so on a
small CPU the two overlap instead of taking turns.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .differential import differential_count, review_counts
from .inputcheck import InputCheck
from .locate import Framing
from .modelfile import bundled_file, bundled_model_path, read_meta, resolve_model_path, weights_sha1
from .segment import DEFAULT_PARAMS
from .transforms import ImageError, ImageSource, prepare, preprocess

log = logging.getLogger("bloodcell")

DEFAULT_REVIEW_THRESHOLD = 0.9
BACKENDS = ("torch", "onnx", "onnx-int8")  # onnx-int8: a quantised file made by `bloodcell export`
JOURNAL_VERSION = 2  # 2: records carry input_warnings


EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES_NOTE = ("16 example cells from the PBC dataset (Acevedo et al., Data in Brief 2020, "
                 "CC BY 4.0), two per class")


def example_files() -> list[Path]:
    """The example cells shipped in the package (``examples/<class>/<file>.jpg``: the
    folder is the true class), sorted; they let `predict --examples`, `make demo` and
    the lab page show real results before any data is downloaded."""
    from .data import IMAGE_EXTENSIONS
    files = sorted(p for p in EXAMPLES_DIR.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no example images in {EXAMPLES_DIR} (an installation without "
                                "its package data?)")
    return files


def examples_note(records: Sequence[dict]) -> str:
    """What the example cells are, and how many the model put in their folder's class."""
    ex = {str(f): f.parent.name for f in example_files()}
    mine = [r for r in records if r["path"] in ex]
    right = sum(r.get("class") == ex[r["path"]] for r in mine)
    return (f"{right} of {len(mine)} example cells predicted as their true class (the folder "
            f"name). They are {EXAMPLES_NOTE}, from the train split the bundled model learnt "
            f"from: a look at the tools, not a measure of accuracy. Sources and licence: "
            f"{EXAMPLES_DIR / 'README.md'}")


def load_screen(screen="auto"):
    """The multi-cell screen: "auto" = the bundled one if present (else None, quietly),
    None/False = none, a path = that one (errors propagate: it was asked for)."""
    if screen is None or screen is False:
        return None
    if screen == "auto":
        if not bundled_file("screen.json").exists():
            return None
        try:
            from .screen import Screen
            return Screen.load(bundled_file("screen.json"))
        except Exception as e:  # the screen is an add-on: never block classification
            log.warning("multi-cell screen not loaded (%s: %s); images are not screened",
                        type(e).__name__, e)
            return None
    if hasattr(screen, "score_arrays"):
        return screen
    from .screen import Screen
    return Screen.load(screen)


def screen_fingerprint(screen) -> str | None:
    """What decides a screen's flags: its whole saved form (mixture, threshold, params,
    image size), hashed; a refitted screen.json must not reuse a journal's flags."""
    if screen is None:
        return None
    if not hasattr(screen, "to_dict"):  # a stand-in without a saved form: its type and size
        return f"{type(screen).__name__}/{getattr(screen, 'image_size', None)}"
    import hashlib
    blob = json.dumps(screen.to_dict(), sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()


class Classifier:
    """A loaded model plus its metadata (classes, image size, temperature)."""

    def __init__(self, model, meta: dict, review_threshold: float | None = None,
                 backend: str = "torch", onnx_path=None, weights_path=None, screen=None,
                 threads: int | None = None):
        """``model`` may be None on an ONNX backend: the torch model is then loaded from
        ``weights_path`` only when needed (an ONNX export to make, ``.model`` asked for),
        so ONNX inference runs without importing torch at all."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
        if model is None and (backend == "torch" or weights_path is None):
            raise ValueError("a Classifier without a torch model needs an ONNX backend and its weights")
        self._model = _channels_last(model) if model is not None else None
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.image_size: int = int(meta["image_size"])
        self.temperature: float = float(meta.get("temperature", 1.0))
        self.review_threshold = float(review_threshold if review_threshold is not None
                                      else meta.get("review_threshold", DEFAULT_REVIEW_THRESHOLD))
        self.backend = backend
        self.weights_path = Path(weights_path) if weights_path else None
        self.screen = screen
        self.input_check = InputCheck.from_meta(meta)
        self.framing = Framing.of_model(meta)
        self.threads = threads
        self.onnx_path = None
        self._session = None
        if threads and backend == "torch":
            import torch
            torch.set_num_threads(int(threads))
        if backend in ("onnx", "onnx-int8"):
            if onnx_path is None and self.weights_path is None:
                raise ValueError(f"backend {backend!r} needs a saved model or an onnx_path")
            self.onnx_path, self._session = self._open_onnx(onnx_path, threads)

    @property
    def model(self):
        """The torch model (loaded on first use when the Classifier was made for ONNX)."""
        if self._model is None:
            from .models import load_model
            self._model = _channels_last(load_model(self.weights_path)[0])
        return self._model

    def _open_onnx(self, onnx_path, threads):
        """(ONNX file, ONNX Runtime session). The file's metadata (which weights it was made
        from) is read from the session opened on it, which is then kept: one parse of the
        file and no import of the onnx package on the way to the first image."""
        from .export import ensure_onnx, find_int8
        opened, tried = {}, []

        def stamp(p):
            st = os.stat(p)
            return st.st_ino, st.st_mtime_ns, st.st_size

        def metadata(p):
            tried.append(p)
            s = self._ort_session(p, threads)
            opened[p] = (stamp(p), s)  # a stale file re-exported in place is a new file
            return dict(s.get_modelmeta().custom_metadata_map)

        path = None
        try:
            if self.backend == "onnx-int8" and onnx_path is None:
                path = find_int8(self.weights_path, metadata)
            else:
                path = ensure_onnx(self.weights_path, self._model, self.meta, onnx_path, metadata)
            st, session = opened.get(path, (None, None))
            return path, session if st == stamp(path) else self._ort_session(path, threads)
        except (OSError, ValueError):  # ours: missing file, other weights
            raise
        except Exception as e:  # onnxruntime's own error types for a damaged or foreign file
            raise ValueError(f"{path or (tried and tried[-1]) or onnx_path}: not a usable ONNX model "
                             f"({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else e})") from None

    @staticmethod
    def _ort_session(path, threads):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        # no pre-planned block for the whole graph: peak memory of `bloodcell predict` over
        # 600 files 537 -> 392 MB, no slower (ORT's arena still reuses the buffers)
        so.enable_mem_pattern = False
        so.log_severity_level = 3  # errors only: graph-optimiser notes are not the user's business
        # no busy-waiting between ops: the decode threads need those cycles
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, backend: str = "torch", onnx_path=None,
             screen="auto", **kw) -> "Classifier":
        """``path``: run folder, model.json or .safetensors (None = the bundled model).
        ``screen``: "auto" (bundled multi-cell screen if any), None, or a screen path."""
        path = path if path is not None else bundled_model_path()
        weights, meta_file = resolve_model_path(path)
        if backend == "torch":
            from .models import load_model
            model, meta = load_model(path)
        else:  # ONNX Runtime: the torch model only if an export must be made
            model, meta = None, read_meta(meta_file)
        return cls(model, meta, backend=backend, onnx_path=onnx_path, weights_path=weights,
                   screen=load_screen(screen), **kw)

    def fingerprint(self) -> dict:
        """What decides a record: a resumed run only reuses records made with the same."""
        return {"weights_sha1": weights_sha1(self.weights_path) if self.weights_path else None,
                "temperature": self.temperature, "review_threshold": self.review_threshold,
                "screen": screen_fingerprint(self.screen),
                "input_check": self.input_check.fingerprint()}

    # -- arrays in, probabilities out
    def predict_logits_arrays(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N,S,S,3] already preprocessed -> raw logits [N,C] (float32); any other
        dtype or shape is refused (``check_batch``)."""
        batch = check_batch(batch, self.image_size)
        if self._session is not None:
            from .export import INPUT_NAME
            return self._session.run(None, {INPUT_NAME: batch})[0].astype(np.float32)
        import torch

        from .tensorops import to_tensor
        with torch.inference_mode():
            return self.model(to_tensor(batch)).float().numpy()

    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N,S,S,3] already preprocessed -> calibrated probabilities [N,C]."""
        return softmax(self.predict_logits_arrays(batch) / self.temperature)

    def preprocess(self, src: ImageSource) -> np.ndarray:
        return preprocess(src, self.image_size, self.framing)

    def predict_proba(self, inputs: Sequence[ImageSource]) -> np.ndarray:
        """scikit-learn style: probabilities for inputs that must all be valid images."""
        return self.predict_proba_arrays(np.stack([self.preprocess(x) for x in inputs]))

    def record(self, name: str, probs: np.ndarray, screen: dict | None = None,
               input_warnings: Sequence[str] = (), cell=None) -> dict:
        """One result; an image with input warnings (see ``check_inputs``) always needs review."""
        return self.records([name], np.asarray(probs)[None], [screen], [input_warnings], [cell])[0]

    def records(self, names: Sequence[str], probs: np.ndarray, screens: Sequence[dict | None],
                input_warnings: Sequence[Sequence[str]], cells: Sequence) -> list[dict]:
        """:meth:`record` for a batch: probabilities [N, C] ranked and made Python floats
        once per batch, not per image (per-image numpy calls cost ~4 % of predict's CPU)."""
        top3 = np.argsort(-probs, axis=1)[:, :3].tolist()
        return [self._record(*row) for row in zip(names, probs.tolist(), top3, screens,
                                                      input_warnings, cells)]

    def _record(self, name, probs: list[float], top3: list[int], screen, input_warnings, cell) -> dict:
        p = probs[top3[0]]
        rec = {"path": name, "status": "ok", "class": self.classes[top3[0]], "probability": p,
               "top3": [{"class": self.classes[i], "probability": probs[i]} for i in top3],
               "probabilities": dict(zip(self.classes, probs)),
               "needs_review": p < self.review_threshold or bool(input_warnings),
               "input_warnings": list(input_warnings)}
        if cell is not None:  # a framing model: was the cell found, or the whole image used?
            rec["cell_located"] = bool(cell.found)
        if screen is not None:
            rec["multi_cell"] = bool(screen["multi_cell"])
            rec["multi_cell_score"] = float(screen["score"])
        return rec

    def check_inputs(self, images: np.ndarray, sources=None) -> list[list[str]]:
        """Input warnings for preprocessed images [N, S, S, 3] (bloodcell.inputcheck): no
        colour, blank, colours unlike the training images, small, far from square, multi-page."""
        try:
            return self.input_check.warnings_batch(images, sources)
        except Exception as e:  # a check failing must not lose the classification
            log.warning("input check failed (%s: %s); images not checked", type(e).__name__, e)
            return [[] for _ in range(len(images))]

    # -- decoding (runs in worker threads)
    def _decode(self, src) -> dict:
        """src -> {"model": uint8 array, "source": SourceInfo, "cell": CellBox | None, and
        "regions" (the framing's stain segmentation, reused by the screen) or "screen_input"}."""
        screen_size = int(self.screen.image_size) if self.screen is not None else None
        if self.framing is None and screen_size not in (None, self.image_size) \
                and isinstance(src, (str, os.PathLike)):
            p = Path(src)  # read the file once; decode per size exactly as preprocess(path) would
            if p.is_file() and p.stat().st_size > 0:
                src = p.read_bytes()
        try:
            prep = prepare(src, self.image_size, self.framing)
            out = {"model": prep.image, "source": prep.source, "cell": prep.cell}
            if screen_size is None:
                return out
            if prep.regions is not None and screen_size == self.framing.work_size \
                    and self.screen.params == DEFAULT_PARAMS:
                out["regions"] = prep.regions  # one segmentation serves framing and screen
            else:
                out["screen_input"] = (prep.image if self.framing is None and screen_size == self.image_size
                                       else preprocess(src, screen_size))
            return out
        except ImageError:
            raise
        except Exception as e:  # one odd file must never end a batch job
            raise ImageError(str(src), f"could not decode ({type(e).__name__}: {e})") from None

    def decode_safe(self, src):
        """-> ({"model": array, "source": SourceInfo, "screen": dict | None, ...}, None) or
        (None, skip reason). The screen scores here, in the worker, so it overlaps with the model too."""
        try:
            arrays = self._decode(src)
        except ImageError as e:
            return None, e.reason
        arrays["screen"] = self._screen_one(arrays)
        return arrays, None

    def _screen_one(self, arrays: dict):
        if self.screen is None:
            return None
        try:
            if "regions" in arrays:
                return self.screen.score_regions(arrays["regions"])
            return self.screen.score_arrays([arrays["screen_input"]])[0]
        except Exception as e:  # an add-on failing must not lose the classification
            log.warning("multi-cell screen failed (%s: %s); image not screened", type(e).__name__, e)
            return None

    def iter_predict(self, inputs: Iterable, names: Iterable[str] | None = None,
                     batch_size: int = 64, workers: int | None = None) -> Iterator[list[tuple[int, dict]]]:
        """Yield lists of (input index, record), one list per model batch, in input order.
        ``workers`` decode threads run up to a few batches ahead of the model (0 = decode inline)."""
        workers = default_workers() if workers is None else workers
        names = iter(names) if names is not None else None
        ex = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 0 else None
        window: deque = deque()
        pending: list[tuple[int, str, dict]] = []
        done: list[tuple[int, dict]] = []
        ahead = max(2 * batch_size, 4 * workers)

        def flush():
            if pending:
                batch = np.stack([a["model"] for _, _, a in pending])
                probs = self.predict_proba_arrays(batch)
                warns = self.check_inputs(batch, [a["source"] for _, _, a in pending])
                recs = self.records([name for _, name, _ in pending], probs,
                                    [a["screen"] for _, _, a in pending], warns,
                                    [a["cell"] for _, _, a in pending])
                done.extend((i, rec) for (i, _, _), rec in zip(pending, recs))
                pending.clear()

        def take():
            i, name, fut = window.popleft()
            arrays, why = fut.result() if ex else fut
            if arrays is None:
                done.append((i, {"path": name, "status": f"skipped: {why}"}))
            else:
                pending.append((i, name, arrays))
            if len(pending) >= batch_size:
                flush()

        try:
            for i, src in enumerate(inputs):
                name = next(names) if names is not None else (
                    str(src) if isinstance(src, (str, os.PathLike)) else f"<input {i}>")
                window.append((i, name, ex.submit(self.decode_safe, src) if ex else self.decode_safe(src)))
                while len(window) > ahead or (not ex and window):
                    take()
                if done:
                    yield sorted(done, key=lambda t: t[0])
                    done.clear()
            while window:  # drain, still handing out each batch as soon as it is done
                take()
                if done:
                    yield sorted(done, key=lambda t: t[0])
                    done.clear()
            flush()
            if done:
                yield sorted(done, key=lambda t: t[0])
        finally:
            if ex:
                for _, _, fut in window:
                    fut.cancel()
                ex.shutdown(wait=True)

    def predict(self, inputs: ImageSource | Iterable[ImageSource], batch_size: int = 64,
                workers: int | None = None) -> list[dict]:
        """Records with class, probability, top-3, needs_review, input_warnings (and
        multi_cell, multi_cell_score when a screen is loaded); bad inputs get
        ``status: 'skipped: <reason>'`` instead of raising."""
        if isinstance(inputs, np.ndarray) and inputs.ndim == 4:
            inputs = list(inputs)  # a batch of images [N, H, W, C]
        elif isinstance(inputs, (str, os.PathLike, bytes, np.ndarray)) or hasattr(inputs, "getpixel"):
            inputs = [inputs]
        inputs = list(inputs)
        out: list[dict | None] = [None] * len(inputs)
        for batch in self.iter_predict(inputs, batch_size=batch_size, workers=workers):
            for i, rec in batch:
                out[i] = rec
        return out


def _channels_last(model):
    import torch  # only ever called with a torch model, so torch is loaded already
    return model.eval().to(memory_format=torch.channels_last)


def check_batch(batch, image_size: int) -> np.ndarray:
    """The batch as a contiguous uint8 [N, S, S, 3] array, or a ValueError naming what is
    wrong: a float image in 0..1 cast to uint8 would silently become 0s and 1s."""
    a = np.asarray(batch)
    want = f"uint8 images [N, {image_size}, {image_size}, 3] (RGB 0-255, as transforms.preprocess makes)"
    if a.dtype != np.uint8:
        hint = (": scale floats to 0-255 first, or pass the images through transforms.preprocess"
                if a.dtype.kind == "f" else "")
        raise ValueError(f"model input must be {want}, got dtype {a.dtype}{hint}")
    if a.ndim != 4 or a.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"model input must be {want}, got shape {list(a.shape)}")
    return np.ascontiguousarray(a)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


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


# ----------------------------------------------------------------------------- summary


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
            **{f"p_{c}": (probs[c] if ok else None) for c in classes}}


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
    for n, r in enumerate(records):
        row = flat_record(r, classes)
        if n == 0:
            w.writerow(list(row))
        w.writerow(["" if v is None else csv_safe(v) if k in text_cols else
                    f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()])
    if not records:
        w.writerow(list(flat_record({"path": "", "status": ""}, classes)))
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
                fingerprint: dict | None = None, engine: str = "local") -> dict:
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
        "review_threshold": clf.review_threshold, "temperature": clf.temperature,
        "multi_cell_screen": clf.screen is not None,
        "n_inputs": len(records), "n_ok": sum(r["status"] == "ok" for r in records),
        "n_skipped": len(skipped), "n_resumed": n_resumed, "n_computed": n_computed,
        "seconds": round(seconds, 3), "images_per_s": n_computed / seconds if seconds > 0 else 0.0,
        "differential": differential_count(records, clf.classes, include_flagged),
        "review": review_counts(records, clf.review_threshold),
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
                  progress: bool = True, resume: bool = True) -> tuple[list[dict], dict]:
    """Classify every image under ``specs`` -> (records in input order, summary).

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
            if k is not None and tuple(k) in old:
                records[i] = old[tuple(k)]
                n_resumed += 1
        if n_resumed:
            log.info("resuming: %d image(s) already done in %s", n_resumed, jp)
        journal = Journal(jp, fp, fresh=not old)
    todo = [i for i, r in enumerate(records) if r is None]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="classifying",
               disable=not progress, mininterval=0.5, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        for batch in clf.iter_predict((items[i][0] for i in todo), names=(items[i][0] for i in todo),
                                      batch_size=batch_size, workers=workers):
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
                          n_resumed=n_resumed, fingerprint=fp)
    if out is not None:
        _finish(out, records, clf.classes, summary)
    return records, summary
