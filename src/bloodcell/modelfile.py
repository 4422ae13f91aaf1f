"""Saved-model files: ``ModelFile``, the typed and versioned model.json; where a model
lives (a run folder, NAME.safetensors + NAME.json, or the bundled one); the hash that
names its weights. No torch here: the ONNX path of ``bloodcell predict`` needs these
without loading PyTorch."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import atomic_write_json, file_digest

# 2: schema_version written. Files without it are version 1 (every model.json before):
# the same fields, read the same way.
SCHEMA_VERSION = 2
REQUIRED = ("architecture", "classes", "image_size")


@dataclass(kw_only=True)
class ModelFile:
    """model.json: what a saved model is (architecture, classes, input size), how it was
    made (training arguments, data, history) and how to read its outputs (temperature,
    review threshold, input-check statistics). Training writes it (``models.save_model``);
    calibrate, adapt and scripts/bundle_model.py update it; the Classifier, evaluate,
    export, the study and the lab page's model card read it. Keys this version does not
    know are kept in ``extra`` and written back unchanged. None = absent from the file."""
    schema_version: int = SCHEMA_VERSION
    architecture: str
    classes: list[str]
    image_size: int
    preprocess: dict = field(default_factory=dict)  # transforms' version, description, framing
    input: str | None = None  # the model's input, in words
    temperature: float = 1.0  # calibrate's fitted T (1.0 = uncalibrated)
    review_threshold: float | None = None  # None: the Classifier's default
    train_args: dict = field(default_factory=dict)  # TrainConfig as run (seed, split_seed, ...)
    data: dict | None = None  # the training data's root, counts and skipped files
    split_manifest_sha1: str | None = None
    library_versions: dict | None = None
    history: list | None = None  # one record per epoch
    best: dict | None = None  # the epoch whose weights were kept
    weights_dtype: str = "float32"
    finished: bool | None = None  # True: training ran to its end; None: not (yet) recorded
    calibration: dict | None = None  # calibrate's report
    input_check: dict | None = None  # inputcheck.fit_input_check's statistics
    metrics: dict | None = None  # the test metrics of a bundled model
    auxiliary_subclasses: list | None = None  # train --subclass-aux: the head's sub-types
    adaptation: dict | None = None  # bloodcell adapt: base model, cells, settings
    description: str | None = None
    version: str | None = None  # a release name; the lab page records it with every cell
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model.json") -> "ModelFile":
        """Checks the fields it knows; a missing or mistyped one is a ValueError naming ``source``."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: not a bloodcell model description (not a JSON object)")
        for key in REQUIRED:
            if key not in d:
                raise ValueError(f"{source}: not a bloodcell model description (missing {key!r})")
        version = d.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(f"{source}: model file schema version {version!r}; this bloodcell reads "
                             f"up to {SCHEMA_VERSION} (upgrade bloodcell)")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        given = {k: v for k, v in d.items() if k in known and v is not None}
        mf = cls(**{**given, "schema_version": SCHEMA_VERSION},
                 extra={k: v for k, v in d.items() if k not in known})
        mf.check(source)
        return mf

    @classmethod
    def of(cls, meta: "ModelFile | dict", source: str = "model.json") -> "ModelFile":
        """A ModelFile as is, or a dict checked as one."""
        return meta if isinstance(meta, cls) else cls.from_dict(meta, source)

    def check(self, source: str = "model.json") -> None:
        """A ValueError naming ``source`` and the first field of the wrong type or value."""
        for name, (ok, want) in _CHECKS.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{source}: field {name!r} must be {want}, not {value!r}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in d.items() if v is not None}, **self.extra}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelFile":
        """A model.json, or the run folder / weights file it belongs to."""
        p = Path(path)
        if p.suffix != ".json":
            _, p = resolve_model_path(p)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(p))

    def save(self, path: str | os.PathLike) -> Path:
        """Checked, then written atomically."""
        self.check(str(path))
        atomic_write_json(Path(path), self.to_dict())
        return Path(path)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _kind(t, what):
    return (lambda v: isinstance(v, t)), what


_CHECKS = {
    "schema_version": (_whole, "a whole number"),
    "architecture": ((lambda v: isinstance(v, str) and bool(v)), "a model name"),
    "classes": ((lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v)),
                "a non-empty list of class names"),
    "image_size": ((lambda v: _whole(v) and v > 0), "a positive whole number"),
    "temperature": ((lambda v: _number(v) and v > 0), "a positive number"),
    "review_threshold": ((lambda v: _number(v) and 0 <= v <= 1), "a number from 0 to 1"),
    "finished": _kind(bool, "true or false"),
    **{n: _kind(str, "a string") for n in ("input", "split_manifest_sha1", "weights_dtype", "description")},
    "version": _kind((str, int, float), "a name or number"),
    **{n: _kind(dict, "a JSON object") for n in ("preprocess", "train_args", "data", "library_versions",
                                                 "best", "calibration", "input_check", "metrics",
                                                 "adaptation")},
    **{n: _kind(list, "a JSON array") for n in ("history", "auxiliary_subclasses")},
}


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


def check_model_path(path: str | os.PathLike | None, option: str = "--model") -> None:
    """A model path as the user gave it, checked before anything loads: the error names the
    option and the path as typed (None: the bundled model)."""
    if path is None:
        resolve_model_path(bundled_model_path())
        return
    hint = "give a run folder, a model.json or a .safetensors file"
    if not str(path).strip():
        raise FileNotFoundError(f"{option} '': an empty path; {hint}")
    try:
        resolve_model_path(path)
    except FileNotFoundError as e:
        what = "no such file or folder" if not Path(path).exists() else str(e).split(" (")[0]
        raise FileNotFoundError(f"{option} {path}: not a model ({what}); {hint}") from None


def weights_sha1(weights_path: str | os.PathLike) -> str:
    """Names the weights in ONNX exports, predict's journal and its provenance."""
    return file_digest(Path(weights_path), "sha1")
