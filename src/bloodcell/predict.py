"""Prediction API: ``Classifier.load()`` (bundled model, or a path) and
``clf.predict(inputs)`` -> one record per input, never raising on a bad one. The
files-and-folders job over it (path expansion, the resume journal, CSV/JSON) is
``bloodcell.batch``; the model itself runs through ``bloodcell.runtime``.

Uses ``transforms.preprocess`` -- the same definition training used. Decoding
runs in a thread pool ahead of the model (PIL releases the GIL while decoding
and resizing; ONNX Runtime and PyTorch release it while computing), so on a
small CPU the two overlap instead of taking turns.
"""
from __future__ import annotations

import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .decoding import Decoder, DecodePool, Route
from .inputcheck import InputCheck
from .locate import Framing
from .modelfile import ModelFile, bundled_file, bundled_model_path, resolve_model_path, weights_sha1
from .runtime import BACKENDS, OnnxRunner, Runner, TorchRunner, ort_session, softmax
from .transforms import ImageSource, preprocess

log = logging.getLogger("bloodcell")

DEFAULT_REVIEW_THRESHOLD = 0.9
FALLBACK_NAME = "other-labs"
FALLBACK_DIR = "other-labs"  # the bundled fallback model's folder, beside the bundled model


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
    """A loaded model plus its model file (classes, image size, temperature)."""

    def __init__(self, model, meta: ModelFile | dict, review_threshold: float | None = None,
                 backend: str = "torch", onnx_path=None, weights_path=None, screen=None,
                 threads: int | None = None, fallback: "Classifier | None" = None, review_views: int = 1):
        """``model`` may be None on an ONNX backend: the torch model is then loaded from
        ``weights_path`` only when needed (an ONNX export to make, ``.model`` asked for),
        so ONNX inference runs without importing torch at all. A dict ``meta`` is checked
        as a ``ModelFile``. ``fallback``: the classifier that answers instead for images
        whose colours this model's input check calls unlike its training images (the
        bundled other-labs model); its records say ``"model": "other-labs"``.
        ``review_views`` 4: the review decision (not the answer) also looks at the image
        flipped both ways and turned 180 degrees (:meth:`review_scores`)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
        if model is None and (backend == "torch" or weights_path is None):
            raise ValueError("a Classifier without a torch model needs an ONNX backend and its weights")
        self._model = _channels_last(model) if model is not None else None
        self.meta = meta = ModelFile.of(meta)
        self.classes: list[str] = list(meta.classes)
        self.image_size: int = meta.image_size
        self.temperature: float = float(meta.temperature)
        if review_threshold is None:  # the calibrated one, else the default
            review_threshold = (meta.review_threshold if meta.review_threshold is not None
                                else DEFAULT_REVIEW_THRESHOLD)
        self.review_threshold = float(review_threshold)
        if review_views not in REVIEW_VIEWS:
            raise ValueError(f"review_views {review_views}: use one of {', '.join(map(str, REVIEW_VIEWS))}")
        self.review_views = review_views
        self.backend = backend
        self.weights_path = Path(weights_path) if weights_path else None
        self.screen = screen
        self.input_check = InputCheck.from_meta(meta)
        self.framing = Framing.of_model(meta)
        self.fallback = _checked_fallback(fallback, self)
        self.threads = threads
        self.onnx_path = None
        self._runner = None  # made on first use for torch (an ONNX Classifier may never need it)
        if threads and backend == "torch":
            import torch
            torch.set_num_threads(int(threads))
        if backend != "torch":
            if onnx_path is None and self.weights_path is None:
                raise ValueError(f"backend {backend!r} needs a saved model or an onnx_path")
            self.onnx_path, session = self._open_onnx(onnx_path, threads)
            self._runner = OnnxRunner(self.onnx_path, self.image_size, session=session)

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
            if p in opened and opened[p][0] == stamp(p):
                return opened[p][2]
            tried.append(p)
            s = ort_session(p, threads)
            meta = dict(s.get_modelmeta().custom_metadata_map)
            opened[p] = (stamp(p), s, meta)  # a stale file re-exported in place is a new file
            return meta

        path = None
        try:
            if self.backend == "auto":
                path = None if onnx_path else auto_int8(self.weights_path, metadata)
                self.backend = "onnx-int8" if path else "onnx"
            if self.backend == "onnx-int8" and onnx_path is None:
                path = path or find_int8(self.weights_path, metadata)
                if not int8_exact_here(metadata(path)):
                    log.warning("%s has 8-bit weights and this CPU has no VNNI/AMX int8 dot product: "
                                "its int8 products can saturate (use --backend onnx, or export with "
                                "--int8-weight-bits 7)", path)
            elif path is None:
                path = ensure_onnx(self.weights_path, self._model, self.meta, onnx_path, metadata)
                if onnx_path and "bloodcell_int8_weight_bits" in metadata(path):
                    self.backend = "onnx-int8"  # an int8 file given by name: say so in the records' summary
            st, session, _ = opened.get(path, (None, None, None))
            return path, session if st == stamp(path) else ort_session(path, threads)
        except (OSError, ValueError):  # ours: missing file, other weights
            raise
        except Exception as e:  # onnxruntime's own error types for a damaged or foreign file
            raise ValueError(f"{path or (tried and tried[-1]) or onnx_path}: not a usable ONNX model "
                             f"({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else e})") from None

    @property
    def runner(self) -> Runner:
        """What turns a uint8 [N, S, S, 3] batch into logits: ONNX Runtime or the torch model."""
        if self._runner is None:
            self._runner = TorchRunner(self.model, self.image_size)
        return self._runner

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, backend: str = "torch", onnx_path=None,
             screen="auto", fallback="auto", **kw) -> "Classifier":
        """``path``: run folder, model.json or .safetensors (None = the bundled model).
        ``screen``: "auto" (bundled multi-cell screen if any), None, or a screen path.
        ``fallback``: the model for images unlike this one's training colours: "auto" (the
        bundled other-labs model, for the bundled model only), None, or a model path."""
        auto = isinstance(fallback, str) and fallback == "auto"
        if auto:
            fallback = bundled_fallback_path() if path is None else None
        path = path if path is not None else bundled_model_path()
        weights, meta_file = resolve_model_path(path)
        if backend == "torch":
            from .models import load_model
            model, meta = load_model(path)
        else:  # ONNX Runtime: the torch model only if an export must be made
            model, meta = None, ModelFile.load(meta_file)
        clf = cls(model, meta, backend=backend, onnx_path=onnx_path, weights_path=weights,
                  screen=load_screen(screen), **kw)
        if fallback is not None:
            try:
                clf.attach_fallback(fallback, backend, kw.get("threads"), kw.get("review_threshold"))
            except Exception as e:
                if not auto:
                    raise
                # like the screen, an add-on: never block the bundled model itself
                log.warning("the bundled other-labs model was not loaded (%s: %s); the bundled model "
                            "classifies every image", type(e).__name__, e)
        return clf

    def attach_fallback(self, fallback, backend: str = "torch", threads: int | None = None,
                        review_threshold: float | None = None) -> None:
        """Route images unlike this model's training colours to ``fallback`` (a Classifier,
        or a model path loaded with this backend, these threads and review threshold)."""
        if not isinstance(fallback, Classifier):
            fallback = Classifier.load(fallback, backend=backend, screen=None, fallback=None, threads=threads,
                                       review_threshold=review_threshold)
        self.fallback = _checked_fallback(fallback, self)

    def answering(self, src: ImageSource) -> tuple["Classifier", np.ndarray]:
        """(the classifier that answers for this input, the array it classifies): this one
        and its preprocessing, or the fallback and its own, as :meth:`predict` routes it."""
        arrays, why = self._unscreened_decoder().decode_safe(src)
        if arrays is None:
            raise ValueError(why)
        return (self.fallback, arrays["alt"]) if "alt" in arrays and self.fallback else (self, arrays["model"])

    def fingerprint(self) -> dict:
        """What decides a record: a resumed run only reuses records made with the same."""
        return {"weights_sha1": weights_sha1(self.weights_path) if self.weights_path else None,
                "backend": self.backend,
                "temperature": self.temperature, "review_threshold": self.review_threshold,
                **({"review_views": self.review_views} if self.review_views > 1 else {}),
                "screen": screen_fingerprint(self.screen),
                "input_check": self.input_check.fingerprint(),
                "preprocess": self.meta.preprocess or None,
                **({"fallback": self.fallback.fingerprint()} if self.fallback else {})}

    # -- arrays in, probabilities out
    def predict_logits_arrays(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N,S,S,3] already preprocessed -> raw logits [N,C] (float32); any other
        dtype or shape is refused with a ValueError (``runtime.check_batch``)."""
        return self.runner.logits(batch)

    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N,S,S,3] already preprocessed -> calibrated probabilities [N,C]."""
        return softmax(self.predict_logits_arrays(batch) / self.temperature)

    def predict_proba_decoded(self, items: Sequence[dict]) -> np.ndarray:
        """Decoded inputs (:meth:`decode_safe`'s dicts) -> calibrated probabilities [N, C]:
        this model's, or the fallback's for the inputs the decoder routed to it ("alt")."""
        if not items:
            return np.zeros((0, len(self.classes)), np.float32)
        routed = np.array([self.fallback is not None and "alt" in a for a in items], bool)
        parts = {}  # each model runs on its own images only
        if not routed.all():
            parts[False] = self.predict_proba_arrays(np.stack([a["model"] for a, r in zip(items, routed) if not r]))
        if routed.any():
            parts[True] = self.fallback.predict_proba_arrays(np.stack([a["alt"] for a, r in zip(items, routed) if r]))
        probs = np.empty((len(items), len(self.classes)), next(iter(parts.values())).dtype)
        for r, p in parts.items():
            probs[routed == r] = p
        return probs

    def review_scores(self, items: Sequence[dict], probs: np.ndarray) -> np.ndarray | None:
        """With ``review_views`` 4: the lowest probability of the answered class over the
        image as classified, flipped left-right, flipped up-down and turned 180 degrees,
        by the model that answered (None with one view). Only images the single view
        leaves unflagged pay for the 3 more views (benchmarks/review_views.py, experiment
        log row 42: at the same threshold, 8.4 % of the PBC test images flagged instead of
        4.7 %, and 99.77 % right on the rest instead of 99.34 %)."""
        if self.review_views == 1 or not len(items):
            return None
        pred = probs.argmax(1)
        score = probs[np.arange(len(probs)), pred].copy()
        routed = np.array([self.fallback is not None and "alt" in a for a in items], bool)
        for r in (False, True):
            clf = self.fallback if r else self
            if clf is None:
                continue
            idx = np.flatnonzero((routed == r) & (score >= clf.review_threshold))
            if not len(idx):
                continue
            x = np.stack([items[i]["alt" if r else "model"] for i in idx])
            for view in (x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]):
                p = clf.predict_proba_arrays(np.ascontiguousarray(view))
                score[idx] = np.minimum(score[idx], p[np.arange(len(idx)), pred[idx]])
        return score

    def preprocess(self, src: ImageSource) -> np.ndarray:
        return preprocess(src, self.image_size, self.framing)

    def predict_proba(self, inputs: Sequence[ImageSource]) -> np.ndarray:
        """scikit-learn style: probabilities for inputs that must all be valid images
        (routed to the fallback as :meth:`predict` routes them; no multi-cell screen)."""
        if self.fallback is None:
            return self.predict_proba_arrays(np.stack([self.preprocess(x) for x in inputs]))
        dec = self._unscreened_decoder()
        items = []
        for i, x in enumerate(inputs):
            arrays, why = dec.decode_safe(x)
            if arrays is None:
                raise ValueError(f"input {i}: {why}")
            items.append(arrays)
        return self.predict_proba_decoded(items)

    def record(self, name: str, probs: np.ndarray, screen: dict | None = None,
               input_warnings: Sequence[str] = (), cell=None, decoded: dict | None = None,
               review: float | None = None) -> dict:
        """One result; an image with input warnings (see ``check_inputs``) always needs review.
        ``decoded``: the input's :meth:`decode_safe` dict (says whether it was routed)."""
        return self.records([name], np.asarray(probs)[None], [screen], [input_warnings], [cell],
                            None if decoded is None else [decoded],
                            None if review is None else np.array([review]))[0]

    def records(self, names: Sequence[str], probs: np.ndarray, screens: Sequence[dict | None],
                input_warnings: Sequence[Sequence[str]], cells: Sequence,
                decoded: Sequence[dict] | None = None, review: np.ndarray | None = None) -> list[dict]:
        """:meth:`record` for a batch: probabilities [N, C] ranked and made Python floats
        once per batch, not per image (per-image numpy calls cost ~4 % of predict's CPU).
        ``review``: :meth:`review_scores` (the review decision's probability per image)."""
        top3 = np.argsort(-probs, axis=1)[:, :3].tolist()
        routed = [self.fallback is not None and "alt" in a for a in decoded or [{}] * len(names)]
        return [self._record(*row) for row in zip(names, probs.tolist(), top3, screens,
                                                      input_warnings, cells, routed,
                                                      decoded or [None] * len(names),
                                                      [None] * len(names) if review is None else review.tolist())]

    def _record(self, name, probs: list[float], top3: list[int], screen, input_warnings, cell,
                routed: bool = False, decoded=None, review: float | None = None) -> dict:
        p = probs[top3[0]]
        threshold = self.fallback.review_threshold if routed else self.review_threshold
        rec = {"path": name, "status": "ok", "class": self.classes[top3[0]], "probability": p,
               "top3": [{"class": self.classes[i], "probability": probs[i]} for i in top3],
               "probabilities": dict(zip(self.classes, probs)),
               "needs_review": (p if review is None else review) < threshold or bool(input_warnings),
               "input_warnings": list(input_warnings)}
        if review is not None:
            rec["review_probability"] = review
        if self.fallback is not None:
            rec["model"] = FALLBACK_NAME if routed else "main"
        if routed:
            cell = decoded.get("alt_cell")
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

    # -- decoding (ahead of the model: bloodcell.decoding)
    def decoder(self) -> Decoder:
        """What decodes inputs for this model: its size, framing and current screen."""
        return Decoder(self.image_size, self.framing, self.screen, self._route())

    def _unscreened_decoder(self) -> Decoder:
        """:meth:`decoder` without the multi-cell screen (the routing decision only)."""
        return Decoder(self.image_size, self.framing, None, self._route())

    def _route(self) -> Route | None:
        """Images the input check calls unlike the training colours -> the fallback's preparation."""
        if self.fallback is None:
            return None
        return Route(self.input_check, self.fallback.image_size, self.fallback.framing)

    def decode_safe(self, src):
        """-> ({"model": array, "source": SourceInfo, "cell", "screen": dict | None}, None) or
        (None, skip reason). The screen scores here, ahead of the model, so it overlaps with it."""
        return self.decoder().decode_safe(src)

    def iter_predict(self, inputs: Iterable, names: Iterable[str] | None = None,
                     batch_size: int = 64, workers: int | None = None,
                     processes: bool = False) -> Iterator[list[tuple[int, dict]]]:
        """Yield lists of (input index, record), one list per model batch, in input order.
        ``workers`` decode threads (or worker processes, with ``processes``) run up to a
        few batches ahead of the model (0 = decode inline)."""
        workers = default_workers() if workers is None else workers
        names = iter(names) if names is not None else None
        pool = DecodePool(self.decoder(), workers, processes)
        window: deque = deque()  # (indices and names, inputs, job), one job per pool.chunk inputs
        queued = 0
        pending: list[tuple[int, str, dict]] = []
        done: list[tuple[int, dict]] = []
        ahead = max(2 * batch_size, 4 * workers)

        def flush():
            if pending:
                items = [a for _, _, a in pending]
                probs = self.predict_proba_decoded(items)
                warns = self.check_inputs(np.stack([a["model"] for a in items]), [a["source"] for a in items])
                recs = self.records([name for _, name, _ in pending], probs, [a["screen"] for a in items],
                                    warns, [a["cell"] for a in items], items, self.review_scores(items, probs))
                done.extend((i, rec) for (i, _, _), rec in zip(pending, recs))
                pending.clear()

        def take():
            nonlocal queued
            keys, srcs, job = window.popleft()
            queued -= len(keys)
            for (i, name), (arrays, why) in zip(keys, pool.result(job, srcs)):
                if arrays is None:
                    done.append((i, {"path": name, "status": f"skipped: {why}"}))
                else:
                    pending.append((i, name, arrays))
                if len(pending) >= batch_size:
                    flush()

        def submit(group):
            nonlocal queued
            if group:
                window.append(([k for k, _ in group], [s for _, s in group], pool.submit([s for _, s in group])))
                queued += len(group)
                group.clear()

        try:
            group: list = []
            for i, src in enumerate(inputs):
                name = next(names) if names is not None else (
                    str(src) if isinstance(src, (str, os.PathLike)) else f"<input {i}>")
                group.append(((i, name), src))
                if len(group) >= pool.chunk:
                    submit(group)
                while queued > ahead or (pool.ex is None and window):
                    take()
                if done:
                    yield sorted(done, key=lambda t: t[0])
                    done.clear()
            submit(group)
            while window:  # drain, still handing out each batch as soon as it is done
                take()
                if done:
                    yield sorted(done, key=lambda t: t[0])
                    done.clear()
            flush()
            if done:
                yield sorted(done, key=lambda t: t[0])
        finally:
            pool.close([job for _, _, job in window])

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


REVIEW_VIEWS = (1, 4)  # views the review decision looks at (the answer is always the first's)


def int8_exact_here(onnx_meta: dict) -> bool:
    """Whether an int8 file's weights multiply without saturating on this CPU: 7-bit
    weights anywhere; 8-bit weights only with an int8 dot product (``cpu.has_int8_dot``)."""
    from .cpu import has_int8_dot
    return onnx_meta.get("bloodcell_int8_weight_bits", "7") != "8" or has_int8_dot()


def auto_int8(weights_path, metadata) -> Path | None:
    """The int8 file ``--backend auto`` runs: next to the weights, made from them, with the
    measured recipe's 8-bit weights (older 7-bit files lost accuracy: those only on request)
    and a CPU that multiplies them exactly. None: run the float model."""
    from .export import default_int8_path
    p = default_int8_path(Path(weights_path))
    if not p.exists():
        return None
    try:
        meta = metadata(p)
    except Exception as e:  # a damaged int8 file must not stop the float model from running
        log.warning("%s not used (%s: %s); running the float model", p, type(e).__name__, e)
        return None
    why = ("it was made from other weights" if meta.get("bloodcell_weights_sha1") != weights_sha1(weights_path)
           else "its weights are 7-bit (an older recipe, less accurate: --backend onnx-int8 runs it)"
           if meta.get("bloodcell_int8_weight_bits") != "8"
           else "this CPU has no int8 dot product (VNNI, AMX): 8-bit weights could saturate"
           if not int8_exact_here(meta) else None)
    if why:
        log.info("running the float model: %s not used, %s", p, why)
        return None
    return p


def bundled_fallback_path() -> Path | None:
    """The bundled other-labs model's folder, None when this installation has none."""
    p = bundled_file(FALLBACK_DIR)
    return p if (p / "model.json").exists() else None


class FallbackMismatch(ValueError):
    """A fallback model that cannot serve this model (other classes, nothing to route on)."""


def _checked_fallback(fallback: "Classifier | None", main: "Classifier") -> "Classifier | None":
    if fallback is None:
        return None
    if not isinstance(fallback, Classifier):
        raise TypeError(f"fallback: a Classifier, not {type(fallback).__name__} (Classifier.load takes a "
                        "model path as fallback=)")
    if list(fallback.classes) != main.classes:
        raise FallbackMismatch(f"other-labs model {fallback.weights_path or ''}: its classes {fallback.classes} "
                         f"are not those of {main.weights_path or 'the main model'} {main.classes}")
    if main.input_check.stats is None:
        raise FallbackMismatch("a fallback model needs the main model's colour statistics to route "
                         "images to it (fit them with `bloodcell calibrate`)")
    if fallback.fallback is not None:
        raise FallbackMismatch("a fallback model cannot have a fallback of its own")
    return fallback


def _channels_last(model):
    import torch  # only ever called with a torch model, so torch is loaded already
    return model.eval().to(memory_format=torch.channels_last)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
