"""Render reference cells in another lab's style: its zoom and its colours.

``bloodcell adapt`` fine-tunes on a few labelled cells of a new lab, plus the
package's PBC example cells of the classes the lab did not label (anchors), so
those classes are not unlearned. In PBC's style the anchors teach the wrong
lesson: "PBC-looking cells are eosinophils, this lab's cells are one of the
labelled classes". Restyled to the lab's zoom (median nucleus extent, found by
the framing's locator) and colours (Reinhard et al. 2001: per-channel mean and
standard deviation in CIELAB), they say "an eosinophil in this lab's look is
still an eosinophil".
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import color

from .locate import locate_image

WORK = 128           # the locator's working size (the screen's)
ZOOM_LIMITS = (0.5, 2.0)


def lab_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of L*, a*, b* over every pixel of ``images`` [N,H,W,3] uint8."""
    lab = color.rgb2lab(images.reshape(-1, 1, 3)).reshape(-1, 3)
    return lab.mean(0), lab.std(0) + 1e-6


def reinhard(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``image`` with its CIELAB channel means and spreads moved to ``mean`` and ``std``."""
    lab = color.rgb2lab(image)
    m, s = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0) + 1e-6
    out = color.lab2rgb((lab - m) / s * std + mean)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def median_extent(images: np.ndarray) -> float | None:
    """Median nucleus extent (fraction of the side) where a nucleus is found; None if none is."""
    found = [c.extent for c in (locate_image(_resized(im, WORK)) for im in images) if c.found]
    return float(np.median(found)) if found else None


def zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """Zoom about the centre at the same size: > 1 crops in, < 1 pads with the slide's
    background colour (its brightest pixels, as the stain segmentation takes it)."""
    size = image.shape[0]
    side = size / factor
    lo = (size - side) / 2
    im = Image.fromarray(image)
    if factor < 1:
        bg = tuple(int(v) for v in np.percentile(image.reshape(-1, 3), 99, axis=0))
        pad = int(np.ceil(-lo))
        canvas = Image.new("RGB", (size + 2 * pad, size + 2 * pad), bg)
        canvas.paste(im, (pad, pad))
        im, lo = canvas, lo + pad
    return np.asarray(im.resize((size, size), Image.BILINEAR, box=(lo, lo, lo + side, lo + side)),
                      dtype=np.uint8)


def restyle(cells: np.ndarray, like: np.ndarray) -> tuple[np.ndarray, dict]:
    """``cells`` [N,S,S,3] zoomed so their median nucleus extent is that of ``like``, then
    given its colour statistics; returns them and what was done."""
    if len(cells) == 0 or len(like) == 0:
        return cells, {"zoom": 1.0}
    theirs, ours = median_extent(like), median_extent(cells)
    factor = 1.0 if not (theirs and ours) else float(np.clip(theirs / ours, *ZOOM_LIMITS))
    zoomed = [zoom(c, factor) if abs(factor - 1) > 0.02 else c for c in cells]
    mean, std = lab_stats(like)
    out = np.stack([reinhard(c, mean, std) for c in zoomed])
    return out, {"zoom": round(factor, 3), "lab_mean": [round(float(v), 2) for v in mean],
                 "lab_std": [round(float(v), 2) for v in std]}


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)
