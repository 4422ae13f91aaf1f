"""Multi-cell screen: features on synthetic cells, fit/save/load, CLI, debug view."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from scipy import ndimage as ndi

from bloodcell.screen import FEATURE_NAMES, Screen, image_features
from bloodcell.segment import (_dilate_cross, _disk, _erode_cross, _fill_holes, _stained_segments,
                               find_regions, optical_density, percentile_u8, red_optical_density)

SIZE = 128


def slide(nuclei, size=SIZE, seed=0, platelets=()):
    """Pink background with pale red cells, purple nuclei (cy, cx, r) and tiny
    dark platelets (cy, cx): a crude May-Grunwald-Giemsa smear."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (250, 225, 205)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(12):  # red cells: transmit red, so they must not count as stain
        cy, cx = rng.uniform(0, size, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.09) ** 2] = (225, 165, 165)
    for cy, cx, r in nuclei:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (r + 6) ** 2] = (200, 190, 220)  # cytoplasm
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = (85, 50, 140)          # nucleus
    for cy, cx in platelets:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 2.5 ** 2] = (120, 70, 150)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


ONE = slide([(64, 64, 14)])
TWO = slide([(64, 64, 14), (20, 108, 13)], seed=1)
LOBED = slide([(64, 52, 7), (64, 66, 7), (64, 80, 7)], seed=2)        # one neutrophil, 3 lobes
PLATELET = slide([], seed=3, platelets=[(64, 64), (30, 90), (100, 20)])  # no nucleus, specks


def feat(img, name):
    return image_features(img)[FEATURE_NAMES.index(name)]


def test_features_one_vs_two_cells():
    assert feat(ONE, "n_regions") == 1
    assert feat(TWO, "n_regions") == 2
    assert feat(ONE, "second_share") < 0.001
    assert feat(TWO, "second_share") > 0.02
    # red cells are not stain: one nucleus of radius 14 is ~3.8% of the image
    assert 0.02 < feat(ONE, "stain_share") < 0.06


@pytest.mark.parametrize("seed", range(6))
def test_fast_paths_equal_the_whole_image_computation(seed):
    """The screen's speed-ups (red-channel lookup table, work on the stain's bounding
    box) must give exactly what the plain whole-image operations give, including
    blobs cut by the image edge, holes and isolated specks."""
    rng = np.random.default_rng(seed)
    img = slide([(rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(4, 16)) for _ in range(3)],
                seed=seed, platelets=[tuple(rng.uniform(0, SIZE, 2)) for _ in range(2)])
    if seed == 0:
        img[:, :6] = (60, 40, 120)   # stain along the whole left edge
        img[60:64, 60:64] = 250      # a hole inside stain
    assert np.array_equal(red_optical_density(img), optical_density(img)[..., 0])
    raw = red_optical_density(img) > 0.25
    mask, dist, seg = _stained_segments(raw, 1)
    ref = ndi.binary_fill_holes(ndi.binary_opening(raw, _disk(1)))
    assert np.array_equal(mask, ref)
    assert np.array_equal(dist, ndi.distance_transform_edt(ref))
    assert np.array_equal(seg, ndi.label(ref)[0])
    empty = _stained_segments(np.zeros((8, 8), bool), 1)
    assert not empty[0].any() and not empty[2].any()


def test_fast_morphology_and_percentile_equal_scipy_and_numpy():
    """The segmentation's own erosion, dilation, hole filling and histogram percentile give
    bit for bit what scipy.ndimage and np.percentile give, on random masks of any shape
    (one-pixel strips, holes at the edge) and random uint8 samples of any size."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        m = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        assert np.array_equal(_erode_cross(m), ndi.binary_erosion(m))
        assert np.array_equal(_dilate_cross(m), ndi.binary_dilation(m))
        assert np.array_equal(_fill_holes(m), ndi.binary_fill_holes(m))
        lo, hi = sorted(int(v) for v in rng.integers(0, 256, 2))
        v = rng.integers(lo, hi + 1, int(rng.integers(1, 2000))).astype(np.uint8)
        for q in (99, 90, 50, 0, 100, 12.5):
            ref = np.percentile(v.astype(np.float32), q)
            got = percentile_u8(v, q)
            assert got == ref and got.dtype == ref.dtype, (q, got, ref)
    ring = np.ones((9, 9), bool)
    ring[3:6, 3:6] = False       # a hole: filled
    ring[0, 4] = ring[1, 4] = False  # ... a notch from the edge is not a hole
    assert _fill_holes(ring)[4, 4] and not _fill_holes(ring)[0, 4]


def test_lobes_are_one_cell_and_platelets_are_no_cell():
    assert feat(LOBED, "n_regions") == 1
    assert feat(PLATELET, "n_regions") == 0
    r = find_regions(TWO)
    assert r.main and len(r.big) == 2
    # the central cell is the one at the centre, not the other one
    yy, xx = np.nonzero(r.labels == r.main)
    assert abs(yy.mean() - 64) < 3 and abs(xx.mean() - 64) < 3


@pytest.fixture
def fitted():
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(60):
        kind = i % 4
        cy, cx = 64 + rng.normal(0, 2, 2)
        r = rng.uniform(10, 16)
        if kind == 0:
            imgs.append(slide([(cy, cx, r), (rng.uniform(10, 25), rng.uniform(100, 118), rng.uniform(10, 14))],
                              seed=i))
        elif kind == 1:
            imgs.append(slide([(cy, cx, r)], seed=i, platelets=[(20, 20), (100, 110)]))
        elif kind == 2:
            imgs.append(slide([(cy, cx, r)], seed=i, platelets=[(15, 100)]))
        else:
            imgs.append(slide([], seed=i, platelets=[(64, 64), (40, 90)]))
    return Screen.fit(np.stack(imgs), image_size=SIZE, progress=False)


def test_fit_flags_two_cells_not_platelets(fitted):
    recs = fitted.score_arrays([ONE, TWO, LOBED, PLATELET])
    assert [r["multi_cell"] for r in recs] == [False, True, False, False]
    assert recs[1]["score"] > recs[0]["score"]
    assert recs[1]["n_regions"] == 2


def test_save_load_roundtrip_is_plain_json(fitted, tmp_path):
    p = fitted.save(tmp_path / "screen.json")
    d = json.loads(p.read_text())  # plain JSON, no pickle
    assert d["format"] == "bloodcell-screen/1" and d["image_size"] == SIZE
    again = Screen.load(p)
    a = fitted.score_arrays([ONE, TWO])
    b = again.score_arrays([ONE, TWO])
    assert a == b
    d["features"] = ["something else"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="refit"):
        Screen.load(tmp_path / "old.json")
    with pytest.raises(FileNotFoundError):
        Screen.load(tmp_path / "missing.json")


def test_bundled_screen_loads():
    scr = Screen.load()
    assert scr.image_size > 0
    assert [r["multi_cell"] for r in scr.score_arrays([ONE, TWO])] == [False, True]


def test_cli_folder_with_bad_file_continues(fitted, tmp_path, capsys):
    from bloodcell.cli import main
    model = fitted.save(tmp_path / "screen.json")
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(ONE).save(d / "one.png")
    Image.fromarray(TWO).save(d / "two.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (d / "notes.txt").write_text("not an image")  # listed with a reason, as predict lists it
    out = tmp_path / "res.csv"
    dbg = tmp_path / "dbg"
    rc = main(["screen", str(d), "--out", str(out), "--screen", str(model), "--debug-dir", str(dbg)])
    assert rc == 0
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    assert rows["one.png"]["multi_cell"] == "False" and rows["two.png"]["multi_cell"] == "True"
    assert rows["broken.jpg"]["status"].startswith("skipped:")
    err = capsys.readouterr().err
    assert rows["notes.txt"]["status"].startswith("skipped:")
    assert "2 skipped" in err and "broken.jpg" in err and "notes.txt" in err
    assert sorted(p.name for p in dbg.iterdir()) == ["one.screen.png", "two.screen.png"]


def test_debug_image_written(fitted, tmp_path):
    src = tmp_path / "two.png"
    Image.fromarray(TWO).save(src)
    rec = fitted.debug_image(src, tmp_path / "dbg.png")
    assert rec["multi_cell"] and rec["n_regions"] == 2
    im = Image.open(tmp_path / "dbg.png")
    assert im.width > 2 * SIZE and im.height > SIZE  # image + mask side by side
    a = np.asarray(im.convert("RGB"))
    assert ((a[..., 0] > 200) & (a[..., 1] < 60)).any()  # the second cell drawn in red


def test_screen_fit_cli(tmp_path):
    from bloodcell.cli import main
    root = tmp_path / "data" / "cells"
    root.mkdir(parents=True)
    for i in range(30):
        nuclei = [(64, 64, 12)] + ([(20, 108, 12)] if i % 3 == 0 else [])
        Image.fromarray(slide(nuclei, seed=i, platelets=[(100, 20)])).save(root / f"{i}.png")
    out = tmp_path / "s.json"
    assert main(["screen-fit", "--data", str(tmp_path / "data"), "--out", str(out), "--no-progress"]) == 0
    assert Screen.load(out).info["n_images"] == 30


@pytest.mark.realdata
def test_bundled_screen_on_real_check_set(real_data):
    """The random part of the hand-labelled check set (docs/screen/checkset.csv):
    all its multi-cell images and every 4th single-cell one, scored from the files."""
    from pathlib import Path
    rows = list(csv.DictReader(open(Path(__file__).resolve().parents[1] / "docs/screen/checkset.csv")))
    rows = [r for r in rows if r["note"].startswith("random")]
    multi = [r for r in rows if r["label"] == "multi"]
    single = [r for r in rows if r["label"] == "single"][::4]
    scr = Screen.load()
    fm = [r["multi_cell"] for r in scr.score_paths([real_data / r["path"] for r in multi])]
    fs = [r["multi_cell"] for r in scr.score_paths([real_data / r["path"] for r in single])]
    assert len(multi) >= 10 and len(single) >= 80
    assert sum(fm) / len(fm) >= 0.8          # recall
    assert sum(fs) <= 2                      # single-cell images flagged
