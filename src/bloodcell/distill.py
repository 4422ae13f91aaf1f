"""Knowledge distillation from a teacher's saved predictions (offline distillation).

The teacher is any model run through ``bloodcell evaluate --out DIR`` on the
student's training images: its ``predictions.csv`` holds one probability per
class and image. A bigger, slower teacher (say EfficientNet-Lite2 at 224 px,
trained on a lent GPU) thereby teaches the fast student without being run
during the student's training, and the student keeps the one preprocessing and
inference path it is served with (no train/serve skew).

The student's loss is ``(1 - w) * CE(student, label) + w * T² * KL(teacher_T || student_T)``
(Hinton et al. 2015), ``teacher_T`` the teacher's probabilities re-tempered by ``T``
(from ``log p``: a softmax is unchanged by the constant that separates log p from
logits). The teacher's probabilities describe the un-augmented image; the student
sees augmented views of it, which the augmentation is built to keep in class.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset

FLOOR = 1e-6  # predictions.csv rounds to 6 decimals: a 0 there is "below 1e-6"


def _key(path: str) -> str:
    """Images are matched by class folder and file stem: a teacher run on a re-encoded
    copy (WebP for a GPU, say) still names the same images."""
    p = Path(path)
    return str(p.with_suffix("")).replace("\\", "/")


@dataclass
class SoftTargets:
    """The teacher's log-probabilities for every image of a dataset, ``[N, C]``
    float32 in the dataset's order and class order; NaN rows for images it did not see."""
    log_probs: torch.Tensor
    weight: float
    temperature: float
    source: str

    @classmethod
    def read(cls, path: str | Path, ds: Dataset, weight: float, temperature: float) -> "SoftTargets":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no teacher predictions file (make one with "
                                    "`bloodcell evaluate --model TEACHER --split train --out DIR`)")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = [c for c in (reader.fieldnames or []) if c.startswith("p_")]
            if "path" not in (reader.fieldnames or []) or not cols:
                raise ValueError(f"{path}: not a predictions.csv (needs a path column and p_<class> columns)")
            teacher_classes = [c[2:] for c in cols]
            if sorted(teacher_classes) != sorted(ds.classes):
                raise ValueError(f"{path}: the teacher's classes {teacher_classes} are not the "
                                 f"dataset's {ds.classes}")
            order = [cols[teacher_classes.index(c)] for c in ds.classes]
            rows = {_key(r["path"]): [float(r[c]) for c in order] for r in reader}
        probs = np.full((len(ds), len(ds.classes)), np.nan, dtype=np.float32)
        for i, s in enumerate(ds.samples):
            row = rows.get(_key(s.path))
            if row is not None:
                probs[i] = row
        log_probs = np.log(np.clip(probs, FLOOR, None))
        return cls(torch.from_numpy(log_probs), weight, temperature, str(path))

    def check_covers(self, idx: np.ndarray, ds: Dataset) -> None:
        """Every training image needs the teacher's answer: name the first few missing."""
        missing = [ds.samples[i].path for i in idx if torch.isnan(self.log_probs[i, 0])]
        if missing:
            raise ValueError(f"{self.source}: no teacher prediction for {len(missing)} of the "
                             f"{len(idx)} training images (first: {', '.join(missing[:3])})")

    def loss(self, logits: torch.Tensor, target: torch.Tensor, idx, label_smoothing: float) -> torch.Tensor:
        """The distillation loss of one batch (``idx``: the images' dataset indices)."""
        t = self.temperature
        teacher = F.log_softmax(self.log_probs[torch.as_tensor(idx)].to(logits.device) / t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), teacher, log_target=True,
                      reduction="batchmean") * t * t
        ce = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        return (1 - self.weight) * ce + self.weight * kd
