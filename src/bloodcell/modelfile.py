"""Saved-model files: where a model lives (a run folder, or NAME.safetensors +
NAME.json) and its metadata. No torch here: the ONNX path of ``bloodcell predict``
needs these without loading PyTorch."""
from __future__ import annotations

import json
import os
from pathlib import Path


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
