"""Offline distillation (distill.py): the student learns the teacher's probabilities."""
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bloodcell.data import scan
from bloodcell.distill import SoftTargets, TeacherFile
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
            w.writerow([str(s.path).rsplit(".", 1)[0] + suffix, ds.classes[s.label], ""]
                       + [f"{v:.6f}" for v in reversed(p)])
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


HEADER = "path,true," + ",".join(f"p_{c}" for c in ("basophil", "eosinophil", "erythroblast", "ig",
                                                     "lymphocyte", "monocyte", "neutrophil", "platelet"))


@pytest.mark.parametrize("body, message", [
    ("basophil/a.jpg,basophil,0.9,0.1,0,0,0,0,0,0\nbasophil/a.png,basophil,1,0,0,0,0,0,0,0",
     "line 3: image basophil/a is also on line 2"),
    ("basophil/a.jpg,basophil,,0.1,0,0,0,0,0,0.9", "line 2: a probability is not a number"),
    ("basophil/a.jpg,basophil,0.9,0.1", "line 2: 4 fields, expected 10"),
    ("basophil/a.jpg,basophil,nan,0.1,0,0,0,0,0,0.9", "line 2: not probabilities"),
    ("basophil/a.jpg,basophil,2.0,-1.0,0,0,0,0,0,0", "line 2: not probabilities"),
    ("basophil/a.jpg,basophil,0.5,0.1,0,0,0,0,0,0", "line 2: not probabilities"),  # sums to 0.6
    (HEADER, "line 2: a probability is not a number"),  # a second header line (files concatenated)
])
def test_bad_teacher_rows_are_refused_naming_file_and_line(tmp_path, body, message):
    (tmp_path / "t.csv").write_text(HEADER + "\n" + body + "\n")
    with pytest.raises(ValueError, match=f"t.csv, {message}"):
        TeacherFile.read(str(tmp_path / "t.csv"))


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
    good = _teacher_file(tmp_path / "good.csv", ds, _all_basophil)
    for weight, temperature in ((1.5, 2.0), (-0.1, 2.0), (0.5, 0.0), (0.5, -1.0)):
        with pytest.raises(ValueError, match="must be"):
            SoftTargets.read(good, ds, weight, temperature)


def test_teacher_labels_must_agree_with_the_dataset(synthetic_dataset, tmp_path):
    ds = scan(synthetic_dataset)
    path = _teacher_file(tmp_path / "t.csv", ds, _all_basophil)
    text = path.read_text().splitlines()
    first = text[1].split(",")
    first[1] = "monocyte"  # the true column of the first image, relabelled
    path.write_text("\n".join([text[0], ",".join(first), *text[2:]]) + "\n")
    with pytest.raises(ValueError, match="another dataset or labelling"):
        SoftTargets.read(path, ds, 0.5, 2.0)


def test_cross_fitted_teacher_files_join_and_must_not_overlap(synthetic_dataset, tmp_path):
    ds = scan(synthetic_dataset)
    half = len(ds) // 2
    a = _teacher_file(tmp_path / "a.csv", ds, _all_basophil)
    b = _teacher_file(tmp_path / "b.csv", ds, _all_basophil, drop=half)
    with pytest.raises(ValueError, match="also in an earlier row or file"):
        TeacherFile.read(f"{a},{b}")
    a.write_text("\n".join(a.read_text().splitlines()[:half + 1]) + "\n")  # the first half only
    soft = SoftTargets.read(f"{a},{b}", ds, 0.5, 2.0)
    soft.check_covers(np.arange(len(ds)), ds)


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


def test_a_distilled_run_records_its_teacher_and_resumes_only_with_it(synthetic_dataset, tmp_path):
    import json
    ds = scan(synthetic_dataset)
    teacher = _teacher_file(tmp_path / "teacher.csv", ds, _all_basophil)
    other = _teacher_file(tmp_path / "other.csv", ds, lambda s: [0.0] * 7 + [1.0])
    run = tmp_path / "run"

    def cfg(**kw):
        base = dict(model="cnn3", data=str(synthetic_dataset), out=str(run), image_size=32, epochs=1,
                    batch_size=16, patience=0, progress=False, pretrained=False, distill=str(teacher))
        return TrainConfig(**{**base, **kw})

    train(cfg())
    rec = json.loads((run / "model.json").read_text())["train_args"]["distill_teacher"]
    assert rec["files"] == [str(teacher.resolve())] and len(rec["sha1"]) == 40 and rec["weight"] == 0.5
    for changed in (dict(distill=None), dict(distill=str(other)), dict(distill_weight=0.9)):
        with pytest.raises(ValueError, match="resume with the settings it started with"):
            train(cfg(epochs=2, resume=True, **changed))
    s = train(cfg(epochs=2, resume=True))
    assert [h["epoch"] for h in s["history"]] == [1, 2]


def test_a_binary_teacher_file_is_named(tmp_path):
    from bloodcell.distill import TeacherFile
    f = tmp_path / "teacher.csv"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="teacher.csv: not a text .CSV. file"):
        TeacherFile.read(str(f))
