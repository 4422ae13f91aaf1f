"""bloodcell adapt: a few labelled cells of another lab -> an adapted run folder."""
from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell import adapt as A
from bloodcell.cli import main
from bloodcell.inputcheck import InputCheck, _prediction_bound, fit_input_check
from bloodcell.predict import Classifier

from conftest import CLASSES, synthetic_cell

FAST = ["--mode", "head", "--steps", "20", "--views", "2", "--folds", "2"]  # seconds; full mode below
WBC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wbc_cellavision"


def _lab_cell(label: int, seed: int) -> np.ndarray:
    """A synthetic cell from 'another lab': bluish stain, larger in the frame."""
    a = synthetic_cell(label, size=96, seed=seed).astype(np.float32)
    return np.clip(a * (0.8, 0.9, 1.1) + (0, 10, 5), 0, 255).astype(np.uint8)


def _save_lite0(d: Path, pretrained: bool, temperature: float) -> Path:
    """A small EfficientNet-Lite0 (64 px) with a PBC-like input check, saved as a run folder."""
    from bloodcell.models import create_model, save_model
    torch.manual_seed(0)
    m = create_model("lite0-recipe", len(CLASSES), 64, pretrained=pretrained).eval()
    pbc_like = np.stack([synthetic_cell(i % 8, seed=1000 + i) for i in range(40)])
    save_model(m, {"architecture": "lite0-recipe", "classes": CLASSES, "image_size": 64,
                   "temperature": temperature, "review_threshold": 0.9,
                   "input_check": fit_input_check(pbc_like)}, d)
    return d


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Random weights: fast."""
    return _save_lite0(tmp_path_factory.mktemp("base"), pretrained=False, temperature=1.5)


@pytest.fixture
def lab_folder(tmp_path):
    """Three classes in odd letter case, 5 images each, plus a broken and a hidden file."""
    root = tmp_path / "lab"
    for name, label in (("NEUTROPHIL", 6), ("Lymphocyte", 4), ("monocyte", 5)):
        d = root / name
        d.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(_lab_cell(label, 100 * label + i)).save(d / f"c{i}.png")
    (root / "monocyte" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "Lymphocyte" / ".DS_Store").write_bytes(b"junk")
    return root


def test_adapt_folder_writes_a_loadable_run_with_provenance(base, lab_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["adapt", "--data", str(lab_folder), "--out", str(out), "--model", str(base),
                 "--seed", "3", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "15 labelled cells" in printed and "skipped 2" in printed
    clf = Classifier.load(out, screen=None)
    base_clf = Classifier.load(base, screen=None)
    assert clf.classes == CLASSES and clf.model.head.out_features == 8
    ad = clf.meta.adaptation
    assert ad["base_weights_sha1"] == hashlib.sha1((base / "model.safetensors").read_bytes()).hexdigest()
    assert ad["settings"]["seed"] == 3 and ad["settings"]["steps"] == 20
    assert ad["class_counts"] == {"lymphocyte": 5, "monocyte": 5, "neutrophil": 5}
    shas = {e["name"]: e["sha1"] for e in ad["images"]}
    assert len(shas) == 15
    assert shas["NEUTROPHIL/c0.png"] == hashlib.sha1((lab_folder / "NEUTROPHIL" / "c0.png").read_bytes()).hexdigest()
    assert {s["path"] for s in ad["skipped"]} == {"monocyte/broken.jpg", "Lymphocyte/.DS_Store"}
    # the weights changed, the preprocessing did not
    assert clf.meta.preprocess == base_clf.meta.preprocess and clf.image_size == 64
    changed = [k for k, v in clf.model.state_dict().items()
               if v.is_floating_point() and not np.allclose(v.numpy(), base_clf.model.state_dict()[k].numpy())]
    assert any(k.startswith("head.") for k in changed)
    # input check refitted on the 15 cells: its statistics are theirs, and it does not flag them
    ic = clf.meta.input_check
    assert ic["n_images"] == 15 and ic["mean"] != base_clf.meta.input_check["mean"]
    imgs = np.stack([clf.preprocess(p) for p in sorted(lab_folder.rglob("c*.png"))])
    assert not any(clf.check_inputs(imgs))
    assert sum(bool(w) for w in base_clf.check_inputs(imgs)) > 0  # the base model did flag these colours
    assert clf.temperature > 0 and ad["cross_fitted"]["folds"] == 2


def test_predict_accepts_the_adapted_run(base, lab_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["adapt", "--data", str(lab_folder), "--out", str(out), "--model", str(base), *FAST]) == 0
    csv = tmp_path / "pred.csv"
    assert main(["predict", str(lab_folder / "monocyte"), "--model", str(out), "--out", str(csv),
                 "--backend", "torch"]) == 0
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 6 and sum("skipped" in r for r in rows) == 1  # 5 cells + the broken file


def test_bad_folders_give_clear_errors(base, tmp_path, capsys):
    root = tmp_path / "lab"
    for name in ("neutrophil", "Neutrofil", "blasts"):
        (root / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'Neutrofil', 'blasts' are not classes of the model"):
        A.load_folder(root, CLASSES, 128)
    assert main(["adapt", "--data", str(root), "--out", str(tmp_path / "r"), "--model", str(base)]) == 2
    assert "Neutrofil" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not found"):
        A.load_folder(tmp_path / "nowhere", CLASSES, 128)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        A.load_folder(empty, CLASSES, 128)
    few = tmp_path / "few"
    (few / "neutrophil").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(synthetic_cell(6, seed=i)).save(few / "neutrophil" / f"{i}.png")
    with pytest.raises(ValueError, match="3 usable labelled image.*at least 12"):
        A.load_folder(few, CLASSES, 128)


def test_out_folder_holding_a_model_is_not_overwritten_unasked(base, lab_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.json").write_text("{}")
    assert main(["adapt", "--data", str(lab_folder), "--out", str(out), "--model", str(base)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "model.json").read_text() == "{}"


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _lab_db(path: Path) -> dict[str, list[str]]:
    """A lab database made by the server's store: two samples, some cells reviewed."""
    from bloodcell.serve.store import Store
    store = Store(path)
    ids: dict[str, list[str]] = {}
    for sname, offset in (("smear A", 0), ("smear B", 50)):
        sid = store.sample_for_name(sname)["id"]
        rows = []
        for j, label in enumerate([6, 4, 5] * 5):
            img = _png(_lab_cell(label, offset + j))
            rows.append({"id": f"{sname[-1]}{j:02d}", "sample_id": sid, "file_name": f"cell{j}.png",
                         "media_type": "image/png", "image": img, "created": "2026-01-01T00:00:00+00:00",
                         "model_version": "test", "predicted_class": "platelet", "probability": 0.5,
                         "probabilities": json.dumps({c: 1 / 8 for c in CLASSES}), "top3": "[]",
                         "needs_review": 1, "multi_cell": None, "multi_cell_score": None, "n_regions": None,
                         "input_warnings": "[]", "image_sha1": hashlib.sha1(img).hexdigest()})
        store.add_cells(rows)
        ids[sname] = [r["id"] for r in rows]
        for j, r in enumerate(rows[:13]):  # 13 reviewed per sample, the rest not
            store.correct(r["id"], CLASSES[[6, 4, 5][j % 3]].upper() if j == 0 else CLASSES[[6, 4, 5][j % 3]])
    store.correct(ids["smear B"][12], None)  # a correction taken back: no longer labelled
    store.close()
    return ids


def test_reviewed_cells_of_the_lab_database_are_the_labelled_cells(base, tmp_path):
    db = tmp_path / "lab.sqlite3"
    _lab_db(db)
    cells = A.load_reviewed(db, CLASSES, 128)
    assert len(cells.labels) == 25
    assert cells.class_counts() == {"lymphocyte": 8, "monocyte": 8, "neutrophil": 9}
    one = A.load_reviewed(db, CLASSES, 128, sample="smear A")
    assert len(one.labels) == 13 and all(n.startswith("smear A/") for n in one.names)
    with pytest.raises(ValueError, match="no sample named 'smear C'"):
        A.load_reviewed(db, CLASSES, 128, sample="smear C")
    with pytest.raises(FileNotFoundError):
        A.load_reviewed(tmp_path / "missing.db", CLASSES, 128)
    before = db.read_bytes()  # the server checkpointed it into the main file when it closed
    assert len(A.load_reviewed(db, CLASSES, 128).labels) == 25
    assert db.read_bytes() == before and not db.with_name("lab.sqlite3-wal").stat().st_size
    out = tmp_path / "run"
    assert main(["adapt", "--db", str(db), "--sample", "smear A", "--out", str(out), "--model", str(base),
                 *FAST]) == 0
    ad = Classifier.load(out, screen=None).meta.adaptation
    assert ad["n_images"] == 13 and ad["data"] == str(db)


def test_adapt_reads_only_lab_databases_and_changes_none(tmp_path):
    import sqlite3
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE customers (id INTEGER)")
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    for db, why in ((other, "not a bloodcell lab database .its tables: customers"),
                    (empty, "empty .0-byte. file")):
        before = db.read_bytes()
        with pytest.raises(OSError, match=why):
            A.load_reviewed(db, CLASSES, 128)
        assert db.read_bytes() == before


def test_class_matching_and_folds():
    assert A.match_class_folders(["IG", "Neutrophil"], CLASSES, "x") == {"IG": 3, "Neutrophil": 6}
    labels = np.array([0] * 5 + [1] * 4 + [2] * 1)
    fold = A._folds(labels, 3, seed=0)
    for c in (0, 1):  # every fold holds some of each class that has enough cells
        assert set(fold[labels == c]) == {0, 1, 2}


def test_small_sample_threshold_of_the_input_check():
    rng = np.random.default_rng(0)
    imgs = np.clip(rng.normal(150, 30, (15, 32, 32, 3)) + rng.normal(0, 10, (15, 1, 1, 3)), 0, 255).astype(np.uint8)
    plain, pred = fit_input_check(imgs), fit_input_check(imgs, predictive=True)
    assert pred["threshold"] >= plain["threshold"] and pred["threshold"] >= _prediction_bound(15, 6, 0.999)
    # the bound shrinks towards the chi bound (sqrt of chi2_6 at 0.999 = 4.74) with more images
    assert _prediction_bound(15, 6, 0.999) > _prediction_bound(100, 6, 0.999) > 4.74
    # a lab's own image size is not "small" for the model adapted to it
    stats = {**pred, "min_side": 100}
    assert InputCheck(stats, 128).warnings(imgs[0], (100, 100)) == []
    assert any("small" in w for w in InputCheck(stats, 128).warnings(imgs[0], (90, 90)))
    assert any("small" in w for w in InputCheck(pred, 128).warnings(imgs[0], (100, 100)))


@pytest.mark.realdata  # with BLOODCELL_REQUIRE=data a missing ../shared is a failure, not a skip
def test_wbc_cellavision_folders_map_to_the_model_classes():
    if not WBC.is_dir():
        pytest.skip(f"{WBC} not found")
    dirs = [d.name for d in WBC.iterdir() if d.is_dir()]
    assert set(A.match_class_folders(dirs, CLASSES, str(WBC)).values()) <= set(range(8))


def test_deeper_adaptation_and_adabn_change_what_they_should(base, lab_folder):
    clf = Classifier.load(base, screen=None)
    cells = A.load_folder(lab_folder, clf.classes, clf.image_size, clf.framing)
    s = A.AdaptSettings(mode="head", views=1, steps=2, folds=0, train_from=15, adabn=1.0)
    a = A.adapt(base, cells, s)
    new, old = a.model.state_dict(), clf.model.state_dict()
    differs = lambda k: not torch.allclose(new[k], old[k])  # noqa: E731
    assert differs("backbone._blocks.15._project_conv.weight")      # the trained block
    assert not differs("backbone._blocks.14._project_conv.weight")  # below it: kept
    assert differs("backbone._bn0.running_mean")                    # AdaBN: the new lab's statistics
    assert a.meta.temperature == 1.5 and "cross_fitted" not in a.report  # folds=0 keeps T


@pytest.fixture(scope="module")
def imagenet_base(tmp_path_factory):
    """Lite0 with its ImageNet backbone and an untrained 8-class head: the features can
    tell the synthetic cells apart, the head cannot yet."""
    return _save_lite0(tmp_path_factory.mktemp("imagenet_base"), pretrained=True, temperature=1.0)


def _lab_cells(labels, per_class: int, seed0: int) -> A.LabelledCells:
    imgs = [_lab_cell(y, seed0 + 10 * i + y) for y in labels for i in range(per_class)]
    ys = np.repeat(labels, per_class)
    return A.LabelledCells(np.stack(imgs), ys.astype(np.int64), CLASSES, [f"c{i}" for i in range(len(ys))],
                           [f"{i:040x}" for i in range(len(ys))], "synthetic", [(96, 96)] * len(ys))


def test_full_fine_tune_learns_the_new_lab_and_keeps_batchnorm_statistics(imagenet_base):
    base = Classifier.load(imagenet_base, screen=None)
    labels = [1, 4, 7]  # nuclei of clearly different sizes
    train = _lab_cells(labels, 6, seed0=0)
    train.images = np.stack([base.preprocess(a) for a in train.images])
    test_imgs = np.stack([base.preprocess(_lab_cell(y, 5000 + 10 * i + y)) for y in labels for i in range(8)])
    test_y = np.repeat(labels, 8)
    before = (base.predict_proba_arrays(test_imgs).argmax(1) == test_y).mean()
    s = A.AdaptSettings(mode="full", steps=15, lr=2e-3, folds=0, seed=1)
    assert (s.train_from, s.batch_size, s.augment) == (0, 0, "turns")  # the mode's defaults
    a = A.adapt(imagenet_base, train, s)
    after = (Classifier(a.model, a.meta).predict_proba_arrays(test_imgs).argmax(1) == test_y).mean()
    assert after >= 0.8 and after > before + 0.3, (before, after)
    new, old = a.model.state_dict(), base.model.state_dict()
    assert not torch.allclose(new["backbone._conv_stem.weight"], old["backbone._conv_stem.weight"])  # every layer
    bn_stats = [k for k in old if k.endswith(("running_mean", "running_var"))]
    assert bn_stats and all(torch.equal(new[k], old[k]) for k in bn_stats)  # statistics frozen
    ad = a.meta.adaptation
    assert ad["settings"]["mode"] == "full" and ad["settings"]["lr"] == 2e-3
    assert ad["temperature_fit"] == "kept the base model's"


def test_full_fine_tune_from_a_block_keeps_the_layers_below(base, lab_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["adapt", "--data", str(lab_folder), "--out", str(out), "--model", str(base), "--mode", "full",
                 "--train-from", "14", "--steps", "2", "--augment", "domain", "--folds", "2"]) == 0
    clf, old = Classifier.load(out, screen=None), Classifier.load(base, screen=None).model.state_dict()
    new = clf.model.state_dict()
    assert not torch.allclose(new["backbone._blocks.14._project_conv.weight"],
                              old["backbone._blocks.14._project_conv.weight"])
    assert torch.equal(new["backbone._blocks.13._project_conv.weight"], old["backbone._blocks.13._project_conv.weight"])
    ad = clf.meta.adaptation
    assert ad["settings"]["augment"] == "domain" and ad["settings"]["mode"] == "full"
    # the temperature comes from cells each out-of-fold copy did not train on
    assert ad["cross_fitted"]["folds"] == 2 and ad["temperature_fit"].startswith("cross-fitted")
    csv = tmp_path / "pred.csv"  # the run folder is a model predict accepts
    assert main(["predict", str(lab_folder / "monocyte"), "--model", str(out), "--out", str(csv),
                 "--backend", "torch"]) == 0
    assert len(csv.read_text().splitlines()) == 1 + 6


def test_turn_augment_keeps_the_cell_and_jitters_its_colours():
    from bloodcell.augment import TurnAugment
    torch.manual_seed(0)
    x = torch.from_numpy(np.stack([synthetic_cell(3, seed=i) for i in range(16)])).permute(0, 3, 1, 2).float()
    aug = TurnAugment().train()
    y = aug(x)
    assert y.shape == x.shape and not torch.allclose(x, y)
    # no resampling: the dark (nucleus) pixel count of each cell survives the turns and jitter
    def dark(t):  # pixels darker than half-way between each image's darkest and brightest
        g = t.mean(1).flatten(1)
        return (g < ((g.amin(1) + g.amax(1)) / 2)[:, None]).sum(1).float()
    assert torch.allclose(dark(y), dark(x), rtol=0.15)
    assert torch.equal(aug.eval()(x), x)


def test_settings_take_their_mode_defaults_and_refuse_unknown_values():
    assert A.AdaptSettings().mode == "full" and A.AdaptSettings().train_from == 0
    assert A.AdaptSettings(mode="head").train_from == 17 and A.AdaptSettings(mode="head").folds == 3
    assert A.AdaptSettings(mode="full", lr=1e-3).lr == 1e-3
    with pytest.raises(ValueError, match="mode 'deep'"):
        A.AdaptSettings(mode="deep")
    with pytest.raises(ValueError, match="augment 'rotate'"):
        A.AdaptSettings(mode="full", augment="rotate")


def test_anchor_cells_are_the_examples_of_the_classes_the_lab_did_not_label():
    cells = _lab_cells([4, 5, 6], 2, seed0=0)
    images, labels = A._anchor_cells(cells, 64, None, style=False)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 7] and len(labels) == 10  # two per missing class
    assert images.shape == (10, 64, 64, 3) and images.dtype == np.uint8
    styled, same = A._anchor_cells(cells, 64, None, style=True)  # in the lab's look: other pixels
    assert np.array_equal(same, labels) and styled.shape == images.shape
    assert np.abs(styled.astype(int) - images).mean() > 5
    assert A.AdaptSettings(mode="full").anchor_style and not A.AdaptSettings(mode="head").anchor_style


def test_cross_fitting_does_not_change_the_full_fine_tune(base, lab_folder):
    """Each fit seeds itself, so the temperature's out-of-fold fits leave the final model as
    it is without them (domain_eval's accuracies with folds=0 are those of the default)."""
    clf = Classifier.load(base, screen=None)
    cells = A.load_folder(lab_folder, clf.classes, clf.image_size, clf.framing)
    a0 = A.adapt(base, cells, A.AdaptSettings(mode="full", steps=2, train_from=14, folds=0, anchors=True))
    a2 = A.adapt(base, cells, A.AdaptSettings(mode="full", steps=2, train_from=14, folds=2, anchors=True))
    sd0, sd2 = a0.model.state_dict(), a2.model.state_dict()
    assert all(torch.equal(sd0[k], sd2[k]) for k in sd0)
    # refitted on the out-of-fold logits, never below the base model's (1.5 here)
    assert a2.meta.adaptation["cross_fitted"]["fitted_temperature"] > 0
    assert a2.meta.temperature == max(1.5, a2.meta.adaptation["cross_fitted"]["fitted_temperature"])


def test_soup_averages_fits_and_wise_blends_back_to_the_start():
    """soup=2: the mean of the fits with seeds s and s + 1000; wise=w: w of that plus
    1 - w of the start (floating tensors only; counters stay)."""
    start = torch.nn.Linear(3, 2)
    w0 = start.weight.detach().clone()

    def fit(part, idx, seed):  # a "fit" that moves the weights by its seed
        with torch.no_grad():
            part.weight.add_(float(seed))
    one = copy.deepcopy(start)
    A._averaged(fit, A.AdaptSettings(mode="head", soup=2, wise=1.0))(one, None, 1)
    assert torch.allclose(one.weight, w0 + (1 + 1001) / 2)
    blended = copy.deepcopy(start)
    A._averaged(fit, A.AdaptSettings(mode="head", soup=2, wise=0.25))(blended, None, 1)
    assert torch.allclose(blended.weight, w0 + 0.25 * (1 + 1001) / 2)
    assert A._averaged(fit, A.AdaptSettings(mode="head")) is fit  # the default: one plain fit
    with pytest.raises(ValueError, match="wise"):
        A.AdaptSettings(wise=1.5)


def test_a_handful_of_cells_all_right_out_of_fold_cannot_make_the_model_overconfident(base, lab_folder,
                                                                                     monkeypatch):
    """Cells every out-of-fold model gets right fit a temperature near 0 (every answer ~1.0,
    no review flag ever): the base model's is kept instead."""
    import bloodcell.calibrate as C
    clf = Classifier.load(base, screen=None)
    cells = A.load_folder(lab_folder, clf.classes, clf.image_size, clf.framing)
    monkeypatch.setattr(C, "fit_temperature", lambda logits, y: 0.07)
    a = A.adapt(base, cells, A.AdaptSettings(mode="head", steps=5, folds=2))
    assert a.meta.temperature == 1.5 and a.report["cross_fitted"]["fitted_temperature"] == 0.07
