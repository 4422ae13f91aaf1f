"""Offline distillation (distill.py): the student learns the teacher's probabilities."""
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bloodcell.data import scan
from bloodcell.distill import SoftTargets
from bloodcell.evaluate import evaluate
from bloodcell.train import TrainConfig, train


def _teacher_file(path, ds, probs_of, suffix=".webp", drop=0):
    """A predictions.csv as `bloodcell evaluate` writes it; file names re-encoded as
    ``suffix`` (a teacher run on a WebP copy), the first ``drop`` images left out."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted"] + [f"p_{c}" for c in reversed(ds.classes)])
        for s in ds.samples[drop:]:
            p = probs_of(s)
            w.writerow([str(s.path).rsplit(".", 1)[0] + suffix, "", ""] + [f"{v:.6f}" for v in reversed(p)])
    return path


def _all_basophil(s):
    return [1.0] + [0.0] * 7


def test_student_follows_a_teacher_that_contradicts_the_labels(synthetic_dataset, tmp_path):
    """With the whole loss on the teacher, a teacher that calls every cell a basophil wins
    over the labels: the student calls (nearly) every validation cell a basophil. Fails
    if the soft targets are ignored, misaligned with the images, or read in the wrong
    class order (the file lists its classes reversed)."""
    ds = scan(synthetic_dataset)
    teacher = _teacher_file(tmp_path / "teacher.csv", ds, _all_basophil)
    cfg = TrainConfig(model="cnn", data=str(synthetic_dataset), out=str(tmp_path / "run"), image_size=32,
                      epochs=4, batch_size=16, lr=3e-3, patience=0, progress=False, pretrained=False,
                      distill=str(teacher), distill_weight=1.0, distill_temperature=1.0)
    train(cfg)
    ev = evaluate(tmp_path / "run", synthetic_dataset, split="val", progress=False)
    assert (ev.probs.argmax(1) == 0).mean() > 0.8


def test_teacher_file_must_cover_the_training_images(synthetic_dataset, tmp_path):
    ds = scan(synthetic_dataset)
    teacher = _teacher_file(tmp_path / "t.csv", ds, _all_basophil, drop=2)
    soft = SoftTargets.read(teacher, ds, 0.5, 2.0)
    with pytest.raises(ValueError, match=r"no teacher prediction for 2 of the .*basophil_0"):
        soft.check_covers(np.arange(len(ds)), ds)
    soft.check_covers(np.arange(2, len(ds)), ds)  # the images it has


def test_teacher_file_errors_name_the_problem(synthetic_dataset, tmp_path):
    ds = scan(synthetic_dataset)
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        SoftTargets.read(tmp_path / "nothing.csv", ds, 0.5, 2.0)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a predictions.csv"):
        SoftTargets.read(tmp_path / "bad.csv", ds, 0.5, 2.0)
    (tmp_path / "other.csv").write_text("path,p_cat,p_dog\nx.jpg,0.5,0.5\n")
    with pytest.raises(ValueError, match="classes"):
        SoftTargets.read(tmp_path / "other.csv", ds, 0.5, 2.0)


def test_loss_is_cross_entropy_at_weight_0_and_zero_kl_on_the_teachers_own_logits(synthetic_dataset, tmp_path):
    ds = scan(synthetic_dataset)
    rng = np.random.default_rng(0)
    table = {str(s.path): rng.dirichlet(np.ones(8)) for s in ds.samples}
    soft = SoftTargets.read(_teacher_file(tmp_path / "t.csv", ds, lambda s: table[str(s.path)]), ds, 0.0, 3.0)
    idx = np.array([0, 5, 9])
    target = torch.as_tensor(ds.labels[idx])
    teacher_logits = torch.log(torch.tensor(np.stack([table[str(ds.samples[i].path)] for i in idx]),
                                            dtype=torch.float32))
    logits = torch.randn(3, 8)
    assert soft.loss(logits, target, idx, 0.1) == pytest.approx(float(F.cross_entropy(logits, target,
                                                                                      label_smoothing=0.1)))
    soft.weight = 1.0
    assert float(soft.loss(teacher_logits, target, idx, 0.1)) == pytest.approx(0.0, abs=1e-3)
    assert float(soft.loss(logits, target, idx, 0.1)) > 0.05
