"""Knowledge distillation from a teacher's saved predictions (offline distillation).

The teacher is any model run through ``bloodcell evaluate --out DIR`` on the
student's training images: its ``predictions.csv`` holds one probability per
class and image. A bigger, slower teacher (say EfficientNet-Lite2 at 224 px,
trained on a lent GPU) thereby teaches the fast student without being run
during the student's training, and the student keeps the one preprocessing and
inference path it is served with (no train/serve skew). Answers of a teacher on
its own training images are nearly its labels; ``scripts/crossfit_splits.py``
makes two teachers that each answer for the half the other trained on (pass both
files, comma-separated).

The student's loss is ``(1 - w) * CE(student, label) + w * T² * KL(teacher_T || student_T)``
(Hinton et al. 2015), ``teacher_T`` the teacher's probabilities re-tempered by ``T``
(from ``log p``: a softmax is unchanged by the constant that separates log p from
logits). The teacher's probabilities describe the un-augmented image; the student
sees augmented views of it, which the augmentation is built to keep in class.
"""
from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset

FLOOR = 1e-6  # predictions.csv rounds to 6 decimals: a 0 there is "below 1e-6"
SUM_TOLERANCE = 1e-3  # rounding to 6 decimals moves a row's sum by at most 8 * 5e-7


def _key(path: str) -> str:
    """Images are matched by class folder and file stem: a teacher run on a re-encoded
    copy (WebP for a GPU, say) still names the same images."""
    return str(Path(path.replace("\\", "/")).with_suffix("")).replace("\\", "/")


@dataclass
class TeacherFile:
    """The rows of one or more predictions.csv files: file stem key -> (true class, probabilities)."""
    paths: list[Path]
    classes: list[str]
    rows: dict[str, tuple[str, np.ndarray]]
    sha1: str

    @classmethod
    def read(cls, spec: str) -> "TeacherFile":
        """``spec``: one path, or several separated by commas (the cross-fit folds)."""
        paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
        if not paths:
            raise ValueError("--distill needs a teacher's predictions.csv")
        classes, rows, digest = None, {}, hashlib.sha1()
        for path in paths:
            try:
                file_classes, file_rows = _read_one(path)
            except UnicodeDecodeError:
                raise ValueError(f"{path}: not a text (CSV) file; --distill takes a teacher's "
                                 "predictions.csv") from None
            if classes is not None and sorted(file_classes) != sorted(classes):
                raise ValueError(f"{path}: classes {file_classes} differ from {paths[0]}'s {classes}")
            if classes is None:
                classes = file_classes
            order = [file_classes.index(c) for c in classes]
            for key, (true, probs, line) in file_rows.items():
                if key in rows:
                    raise ValueError(f"{path}, line {line}: image {key} is also in an earlier "
                                     "row or file (one teacher answer per image)")
                rows[key] = (true, probs[order])
            digest.update(path.read_bytes())
        return cls(paths, classes, rows, digest.hexdigest())


def _read_one(path: Path) -> tuple[list[str], dict[str, tuple[str, np.ndarray, int]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher predictions file (make one with `bloodcell "
                                "evaluate --model TEACHER --split SPLIT --out DIR`)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        cols = [i for i, c in enumerate(header) if c.startswith("p_")]
        if "path" not in header or not cols:
            raise ValueError(f"{path}: not a predictions.csv (needs a path column and p_<class> columns)")
        ip, it = header.index("path"), header.index("true") if "true" in header else None
        rows = {}
        for line, r in enumerate(reader, start=2):
            if not r:
                continue  # a blank line
            key = _key(r[ip]) if len(r) > ip else ""
            probs = _probabilities(path, line, r, cols)
            if key in rows:
                raise ValueError(f"{path}, line {line}: image {key} is also on line {rows[key][2]}")
            rows[key] = (r[it] if it is not None else "", probs, line)
    return [header[i][2:] for i in cols], rows


def _probabilities(path: Path, line: int, row: list[str], cols: list[int]) -> np.ndarray:
    """One row's probabilities, checked: a number per class, finite, >= 0, summing to 1."""
    if len(row) <= max(cols):
        raise ValueError(f"{path}, line {line}: {len(row)} fields, expected {max(cols) + 1}")
    try:
        p = np.array([float(row[i]) for i in cols], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}, line {line}: a probability is not a number "
                         f"({', '.join(row[i] for i in cols)})") from None
    if not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1) > SUM_TOLERANCE:
        raise ValueError(f"{path}, line {line}: not probabilities (each in 0..1, summing to 1): "
                         f"{', '.join(row[i] for i in cols)}")
    return p


def check_settings(weight: float, temperature: float) -> None:
    if not 0 <= weight <= 1:
        raise ValueError(f"--distill-weight {weight}: must be between 0 and 1")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"--distill-temperature {temperature}: must be a positive number")


@dataclass
class SoftTargets:
    """The teacher's log-probabilities for every image of a dataset, ``[N, C]``
    float32 in the dataset's order and class order; NaN rows for images it did not see."""
    log_probs: torch.Tensor
    weight: float
    temperature: float
    teacher: TeacherFile

    @classmethod
    def read(cls, spec: str | Path, ds: Dataset, weight: float, temperature: float,
             teacher: TeacherFile | None = None) -> "SoftTargets":
        check_settings(weight, temperature)
        teacher = teacher or TeacherFile.read(str(spec))
        if sorted(teacher.classes) != sorted(ds.classes):
            raise ValueError(f"{spec}: the teacher's classes {teacher.classes} are not the "
                             f"dataset's {ds.classes}")
        order = [teacher.classes.index(c) for c in ds.classes]
        probs = np.full((len(ds), len(ds.classes)), np.nan, dtype=np.float32)
        for i, s in enumerate(ds.samples):
            row = teacher.rows.get(_key(str(s.path)))
            if row is not None:
                if row[0] and row[0] != ds.classes[s.label]:
                    raise ValueError(f"{spec}: {s.path} is {row[0]!r} in the teacher's file and "
                                     f"{ds.classes[s.label]!r} here (another dataset or labelling?)")
                probs[i] = row[1][order]
        log_probs = np.log(np.clip(probs, FLOOR, None))
        return cls(torch.from_numpy(log_probs), weight, temperature, teacher)

    def check_covers(self, idx: np.ndarray, ds: Dataset) -> None:
        """Every training image needs the teacher's answer: name the first few missing."""
        missing = [str(ds.samples[i].path) for i in idx if torch.isnan(self.log_probs[i, 0])]
        if missing:
            theirs = ", ".join(list(self.teacher.rows)[:2])
            raise ValueError(f"{','.join(map(str, self.teacher.paths))}: no teacher prediction for "
                             f"{len(missing)} of the {len(idx)} training images (first: "
                             f"{', '.join(missing[:3])}; the file names e.g. {theirs}, matched "
                             "by class folder and file name without its extension)")

    def record(self) -> dict:
        """What a run records and a resumed run must match."""
        return {"files": [str(p.resolve()) for p in self.teacher.paths], "sha1": self.teacher.sha1,
                "weight": self.weight, "temperature": self.temperature}

    def loss(self, logits: torch.Tensor, target: torch.Tensor, idx, label_smoothing: float) -> torch.Tensor:
        """The distillation loss of one batch (``idx``: the images' dataset indices)."""
        t = self.temperature
        teacher = F.log_softmax(self.log_probs[torch.as_tensor(idx)].to(logits.device) / t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), teacher, log_target=True,
                      reduction="batchmean") * t * t
        ce = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        return (1 - self.weight) * ce + self.weight * kd
