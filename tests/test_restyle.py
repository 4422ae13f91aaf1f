"""bloodcell.restyle: reference cells rendered in another lab's zoom and colours
(adapt's anchors), on synthetic cells."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import color

from bloodcell.restyle import lab_stats, median_extent, reinhard, restyle, zoom

BG = (236, 214, 222)


def cell(radius: float, size: int = 128, nucleus=(105, 45, 150), bg=BG, seed: int = 0) -> np.ndarray:
    """A slide-coloured square with a round purple nucleus of ``radius`` px at the centre."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    img += rng.normal(0, 3, img.shape)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.normal(0, 1.5, 2)
    img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 < radius ** 2] = nucleus
    return np.clip(img, 0, 255).astype(np.uint8)


def test_zoom_in_doubles_the_nucleus_and_zoom_out_pads_with_the_background():
    im = cell(16)
    base = median_extent(im[None])
    assert base == pytest.approx(32 / 128, abs=0.03)
    assert median_extent(zoom(im, 2.0)[None]) == pytest.approx(2 * base, rel=0.1)
    out = zoom(im, 0.5)
    assert median_extent(out[None]) == pytest.approx(base / 2, rel=0.15)
    corner = out[:10, :10].reshape(-1, 3).mean(0)
    assert np.abs(corner - BG).max() < 8  # padding has the slide's colour, not black


def test_reinhard_moves_the_colour_statistics_to_the_target():
    src = cell(20, seed=1)
    target = np.stack([cell(24, nucleus=(60, 70, 170), bg=(225, 225, 195), seed=s) for s in range(3)])
    mean, std = lab_stats(target)
    out = reinhard(src, mean, std)
    lab = color.rgb2lab(out).reshape(-1, 3)
    assert np.allclose(lab.mean(0), mean, atol=1.5)
    assert np.allclose(lab.std(0), std, rtol=0.1, atol=0.5)
    before = color.rgb2lab(src).reshape(-1, 3).mean(0)
    assert np.abs(before - mean).max() > 5  # it did have to move


def test_restyle_matches_the_labs_zoom_and_colours():
    pbc = np.stack([cell(14, seed=s) for s in range(4)])
    lab = np.stack([cell(21, nucleus=(70, 60, 160), bg=(228, 222, 200), seed=10 + s) for s in range(6)])
    out, how = restyle(pbc, lab)
    assert out.shape == pbc.shape and out.dtype == np.uint8
    assert how["zoom"] == pytest.approx(1.5, rel=0.1)
    assert median_extent(out) == pytest.approx(median_extent(lab), rel=0.12)
    assert np.allclose(lab_stats(out)[0], lab_stats(lab)[0], atol=2.0)
    same, how = restyle(pbc[:0], lab)  # nothing to restyle
    assert len(same) == 0 and how["zoom"] == 1.0
