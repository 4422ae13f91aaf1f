"""Input checks: images unlike the training images are named, sent to review and
left out of the differential count; fitted by `bloodcell calibrate`."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_cell
from test_predict import make_model

from bloodcell.cli.predict import format_summary
from bloodcell.differential import differential_count
from bloodcell import batch as B
from bloodcell import predict as P
from bloodcell.inputcheck import FEATURES, InputCheck, colour_features, fit_input_check
from bloodcell.transforms import SourceInfo, preprocess, preprocess_with_info


def stained(n, size=64, seed=0):
    """n synthetic 'stained cells' with some spread of stain and exposure."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = synthetic_cell(i % 8, size, seed=seed * 1000 + i).astype(np.float32)
        a *= rng.uniform(0.93, 1.07, 3)  # stain variation between slides
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def check():
    return InputCheck(fit_input_check(stained(400)), image_size=64)


def test_colour_features_values():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    a[0, ..., 0] = 200
    a[1, :8, :, 2] = 100  # half the blue channel at 100: mean 50, sd 50
    f = colour_features(a)
    assert f.shape == (2, len(FEATURES))
    np.testing.assert_allclose(f[0], [200, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(f[1], [0, 0, 50, 0, 0, 50])
    np.testing.assert_allclose(colour_features(a[0]), f[:1])


def test_in_distribution_images_pass(check):
    new = stained(300, seed=1)  # same process, images never seen by the fit
    flagged = [w for w in (check.warnings(a, (64, 64)) for a in new) if w]
    assert len(flagged) <= 6  # threshold at the 99.9 % quantile of the fitted images
    d = check.distance(new)
    assert d.shape == (300,) and np.median(d) < 0.7 * check.threshold


@pytest.mark.parametrize("make, expect", [
    (lambda a: np.repeat(a.mean(2, keepdims=True), 3, 2).astype(np.uint8), "no colour"),
    (lambda a: np.full_like(a, 128), "no colour"),          # uniform gray: both messages
    (lambda a: np.full_like(a, (250, 10, 10)), "blank"),    # uniform red
    (lambda a: a[..., ::-1].copy(), "colours unlike"),       # channels swapped
    (lambda a: (a * 0.6).astype(np.uint8), "colours unlike"),  # badly under-exposed
    (lambda a: np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8), "colours unlike"),
])
def test_out_of_distribution_images_are_named(check, make, expect):
    a = make(stained(1, seed=2)[0])
    w = check.warnings(a, (64, 64))
    assert any(expect in x for x in w), w


def test_geometry_warnings(check):
    a = stained(1, seed=3)[0]
    assert check.warnings(a, (64, 64)) == []
    assert any("small image (40x40 px, upscaled to 64)" in x for x in check.warnings(a, (40, 40)))
    assert any("not square (300x100 px)" in x for x in check.warnings(a, (300, 100)))
    assert check.warnings(a, (66, 64)) == []  # PBC crops are 360x363: nearly square passes


def test_without_statistics_only_structural_checks():
    c = InputCheck(None, 64)
    a = stained(1)[0]
    assert c.warnings(a[..., ::-1].copy(), (64, 64)) == []  # colour statistics unknown
    assert any("no colour" in x for x in c.warnings(np.full_like(a, 90), (64, 64)))
    assert c.fingerprint() is None
    with pytest.raises(ValueError, match="calibrate"):
        c.distance(a)


def test_fit_needs_enough_images_and_same_features():
    with pytest.raises(ValueError, match="at least"):
        fit_input_check(stained(5))
    stats = fit_input_check(stained(40), index=np.arange(20, 40))
    assert stats["n_images"] == 20 and stats["features"] == FEATURES
    with pytest.raises(ValueError, match="other features"):
        InputCheck({**stats, "features": ["hue"]}, 64)


def test_preprocess_with_info_reports_the_original_size(tmp_path):
    big = np.tile(synthetic_cell(2, 64), (10, 16, 1))  # 640 x 1024
    p = tmp_path / "wide.jpg"
    Image.fromarray(big).save(p, quality=90)
    arr, info = preprocess_with_info(str(p), 64)  # JPEG draft mode decodes it at 1/4 scale
    assert info == SourceInfo(1024, 640, 1) and arr.shape == (64, 64, 3)
    np.testing.assert_array_equal(arr, preprocess(str(p), 64))  # one preprocessing
    # a camera-rotated JPEG (EXIF orientation 6): the size as displayed
    b = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(big[:320]).save(b, "JPEG", exif=exif)
    assert preprocess_with_info(b.getvalue(), 64)[1][:2] == (320, 1024)
    assert preprocess_with_info(big[:100, :90], 64)[1][:2] == (90, 100)
    # a two-page TIFF: only the first page is used, and the check says so
    tif = tmp_path / "stack.tif"
    pages = [Image.fromarray(synthetic_cell(k, 64, seed=k)) for k in (1, 5)]
    pages[0].save(tif, save_all=True, append_images=pages[1:])
    arr, info = preprocess_with_info(str(tif), 64)
    assert info.frames == 2
    np.testing.assert_array_equal(arr, np.asarray(pages[0]))
    assert any("2 frames or pages" in w for w in InputCheck(None, 64).warnings(arr, info))


@pytest.fixture
def checked_model(tmp_path):
    d = make_model(tmp_path / "m")
    meta = json.loads((d / "model.json").read_text())
    meta["input_check"] = fit_input_check(stained(400))
    (d / "model.json").write_text(json.dumps(meta))
    return d


def test_classifier_flags_excludes_and_reports(checked_model, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, a in enumerate(stained(6, seed=4)):
        Image.fromarray(a).save(imgs / f"ok{i}.png")
    Image.fromarray(stained(1, seed=5)[0][..., ::-1].copy()).save(imgs / "swapped.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(imgs / "gray.png")
    Image.fromarray(stained(1, seed=6)[0][:20, :20]).save(imgs / "tiny.png")
    clf = P.Classifier.load(checked_model, backend="torch", screen=None)
    recs, s = B.predict_paths(clf, [str(imgs)], out=tmp_path / "r.csv", progress=False)
    by = {r["path"].rsplit("/", 1)[1]: r for r in recs}
    for name in ("swapped.png", "gray.png", "tiny.png"):
        assert by[name]["input_warnings"] and by[name]["needs_review"], name
    assert "colours unlike" in by["swapped.png"]["input_warnings"][0]
    assert sum(bool(r["input_warnings"]) for r in recs) == 3
    d = s["differential"]
    assert d["n_input_warnings"] == 3 and d["n_counted"] == 6 and d["n_ok"] == 9
    d2 = differential_count(recs, clf.classes, include_flagged=True)
    assert d2["n_counted"] == 9
    assert "3 with input warnings left out" in format_summary(s)
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert "input_warnings" in rows[0].split(",")
    assert any("gray.png" in r and "no colour" in r for r in rows)
    # the same through the Python API, on arrays
    rec = clf.predict([np.full((64, 64, 3), 128, np.uint8)])[0]
    assert rec["needs_review"] and any("no colour" in w for w in rec["input_warnings"])


def test_changed_statistics_invalidate_the_journal(checked_model):
    fp = P.Classifier.load(checked_model, backend="torch", screen=None).fingerprint()
    meta = json.loads((checked_model / "model.json").read_text())
    meta["input_check"]["threshold"] *= 2
    (checked_model / "model.json").write_text(json.dumps(meta))
    assert P.Classifier.load(checked_model, backend="torch", screen=None).fingerprint() != fp


def test_calibrate_fits_and_stores_the_check(tmp_path, synthetic_dataset):
    from bloodcell import calibrate as C
    d = make_model(tmp_path / "m", gain=200.0)
    r = C.calibrate(d, synthetic_dataset, progress=False)
    meta = json.loads((d / "model.json").read_text())
    ic = meta["input_check"]
    assert ic["features"] == FEATURES and ic["n_images"] > 12
    assert 0 <= ic["share_flagged_val"] <= 1 and r["input_check"]["threshold"] == ic["threshold"]
    assert "input check" in C.format_report(r)
    clf = P.Classifier.load(d, backend="torch", screen=None)
    assert clf.input_check.threshold == pytest.approx(ic["threshold"])


def test_real_images_pass_and_their_grayscale_copies_do_not(real_data):
    """The bundled model's statistics on real PBC files (any split): few flagged."""
    clf = P.Classifier.load(backend="onnx", screen=None)
    assert clf.input_check.stats is not None  # fitted by `bloodcell calibrate`
    files = [p for c in sorted(real_data.iterdir()) if c.is_dir() for p in sorted(c.glob("*.jpg"))[:25]]
    recs = [r for r in clf.predict(files) if r["status"] == "ok"]  # the folder holds a stray .DS_ file
    assert len(recs) >= 190 and sum(bool(r["input_warnings"]) for r in recs) <= 2
    gray = [np.repeat(np.asarray(Image.open(p).convert("L"))[..., None], 3, 2) for p in files[::20]]
    assert all(any("no colour" in w for w in r["input_warnings"]) for r in clf.predict(gray))
