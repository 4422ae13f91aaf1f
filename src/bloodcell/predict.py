"""Prediction API: ``Classifier.load()`` (bundled model, or a path) and
``clf.predict(inputs)`` -> one record per input, never raising on a bad one.

Uses ``transforms.preprocess`` -- the same definition training used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .transforms import ImageError, ImageSource, preprocess, to_tensor

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
DEFAULT_REVIEW_THRESHOLD = 0.9


def bundled_model_path() -> Path:
    p = BUNDLED_DIR / "model.json"
    if not p.exists():
        raise FileNotFoundError(f"no bundled model at {p}; pass a model path (--model RUN_DIR)")
    return p


class Classifier:
    """A loaded model plus its metadata (classes, image size, temperature)."""

    def __init__(self, model, meta: dict, review_threshold: float | None = None):
        import torch
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.image_size: int = int(meta["image_size"])
        self.temperature: float = float(meta.get("temperature", 1.0))
        self.review_threshold = float(review_threshold if review_threshold is not None
                                      else meta.get("review_threshold", DEFAULT_REVIEW_THRESHOLD))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **kw) -> "Classifier":
        from .models import load_model
        model, meta = load_model(path if path is not None else bundled_model_path())
        return cls(model, meta, **kw)

    # -- arrays in, probabilities out
    def predict_proba_arrays(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N,S,S,3] already preprocessed -> calibrated probabilities [N,C]."""
        import torch
        with torch.inference_mode():
            logits = self.model(to_tensor(batch))
            return torch.softmax(logits.float() / self.temperature, 1).numpy()

    def preprocess(self, src: ImageSource) -> np.ndarray:
        return preprocess(src, self.image_size)

    def predict_proba(self, inputs: Sequence[ImageSource]) -> np.ndarray:
        """scikit-learn style: probabilities for inputs that must all be valid images."""
        return self.predict_proba_arrays(np.stack([self.preprocess(x) for x in inputs]))

    def record(self, name: str, probs: np.ndarray) -> dict:
        order = np.argsort(-probs)
        p = float(probs[order[0]])
        return {"path": name, "status": "ok", "class": self.classes[order[0]], "probability": p,
                "top3": [{"class": self.classes[i], "probability": float(probs[i])} for i in order[:3]],
                "probabilities": {c: float(v) for c, v in zip(self.classes, probs)},
                "needs_review": p < self.review_threshold}

    def predict(self, inputs: ImageSource | Iterable[ImageSource], batch_size: int = 64) -> list[dict]:
        """Records with class, probability, top-3, needs_review; bad inputs get
        ``status: 'skipped: <reason>'`` instead of raising."""
        if isinstance(inputs, (str, os.PathLike, bytes, np.ndarray)) or hasattr(inputs, "getpixel"):
            inputs = [inputs]
        out: list[dict] = []
        pending: list[tuple[int, np.ndarray]] = []

        def flush():
            if pending:
                probs = self.predict_proba_arrays(np.stack([a for _, a in pending]))
                for (i, _), pr in zip(pending, probs):
                    out[i] = self.record(out[i]["path"], pr)
                pending.clear()

        for i, src in enumerate(inputs):
            name = str(src) if isinstance(src, (str, os.PathLike)) else f"<input {i}>"
            out.append({"path": name})
            try:
                pending.append((i, self.preprocess(src)))
            except ImageError as e:
                out[i] = {"path": name, "status": f"skipped: {e.reason}"}
            if len(pending) >= batch_size:
                flush()
        flush()
        return out
