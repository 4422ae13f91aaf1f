"""Saved-model files: where a model lives (a run folder, NAME.safetensors + NAME.json,
or the bundled one), its metadata and the hash that names its weights. No torch here:
the ONNX path of ``bloodcell predict`` needs these without loading PyTorch."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .data import file_digest

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


def bundled_file(name: str) -> Path:
    """A file shipped with the package (model.json, screen.json, ...), existing or not."""
    return BUNDLED_DIR / name


def bundled_model_path() -> Path:
    p = bundled_file("model.json")
    if not p.exists():
        raise FileNotFoundError(f"no bundled model at {p}; pass a model path (--model RUN_DIR)")
    return p


def resolve_model_path(path: str | os.PathLike) -> tuple[Path, Path]:
    """A run dir, a .safetensors or a .json -> (weights path, json path)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.json"
    if p.suffix == ".safetensors":
        w, j = p, p.with_suffix(".json")
    else:
        w, j = p.with_suffix(".safetensors"), p.with_suffix(".json")
    for f in (w, j):
        if not f.exists():
            raise FileNotFoundError(f"model file not found: {f} (a model is NAME.safetensors + NAME.json, "
                                    "or a run folder holding model.safetensors + model.json)")
    return w, j


def read_meta(json_path: str | os.PathLike) -> dict:
    """A model's metadata (model.json), checked for what every reader needs."""
    j = Path(json_path)
    try:
        meta = json.loads(j.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{j}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{j}: not a bloodcell model description (not a JSON object)")
    for key in ("architecture", "classes", "image_size"):
        if key not in meta:
            raise ValueError(f"{j}: not a bloodcell model description (missing {key!r})")
    return meta


def weights_sha1(weights_path: str | os.PathLike) -> str:
    """Names the weights in ONNX exports, predict's journal and its provenance."""
    return file_digest(Path(weights_path), "sha1")
