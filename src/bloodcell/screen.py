"""The multi-cell screen: flags images that hold more than one white/nucleated cell.

The study's proposal, built without labels: per-image *stain features* (the
nucleus-stained pixels and the stained regions of white-cell size, found
relative to the image centre), then an unsupervised Gaussian mixture over the
features of the strongest candidate second cell, fitted on a dataset folder.
The score is the log posterior odds of the "large dark second nucleus" cluster;
``score > threshold`` (0 = even odds) flags the image.

Why optical density in the red channel: May-Grunwald-Giemsa nuclei are
purple/blue and absorb red light strongly, while red cells, eosinophil granules
(orange) and the background transmit it. Dividing by each image's own
background (its brightest pixels) makes the measure robust to the pink or
lilac casts of different slides. Platelets are small and paler, so they fall
under the size and darkness limits instead of counting as cells.

The fitted model is plain JSON (no pickle): the mixture's weights, means and
covariances, evaluated here with numpy. Measured in docs/screen/screen_report.md.
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from .segment import DEFAULT_PARAMS, Regions, find_regions
from .transforms import ImageError, ImageSource, preprocess

log = logging.getLogger("bloodcell")

BUNDLED_SCREEN = Path(__file__).resolve().parent / "bundled" / "screen.json"
FORMAT = "bloodcell-screen/1"
DEFAULT_IMAGE_SIZE = 128

# ----------------------------------------------------------------------------- features

FEATURE_NAMES = [
    "stain_share",        # nucleus-stained pixels / image
    "stain_od",           # mean red OD of stained pixels (stain intensity)
    "n_regions",          # white-cell-size stained regions (lobes grouped)
    "main_share",         # area of the central region / image
    "main_offset",        # distance of the central region's centroid from the centre / side
    "second_share",       # area of the largest other stained group (any size) / image
    "second_od",          # its 90th-percentile red OD: nuclei are dark (0 if none)
    "second_thick",       # its half-width (max distance to its edge) / side: a nucleus is thick
    "other_share",        # stained area in white-cell-size regions outside the central one / image
    "outside_share",      # share of all stained area that lies outside the central region
]


def features_from_regions(r: Regions) -> np.ndarray:
    h, w = r.mask.shape
    n_px = float(h * w)
    stained = int(r.mask.sum())
    f = dict.fromkeys(FEATURE_NAMES, 0.0)
    f["stain_share"] = stained / n_px
    f["stain_od"] = float(r.od[r.mask].mean()) if stained else 0.0
    f["n_regions"] = float(len(r.big))
    counts = r.areas if r.areas is not None else np.bincount(r.labels.ravel())
    if r.main:
        yy, xx = np.nonzero(r.labels == r.main)
        main_area = int(counts[r.main])
        f["main_share"] = main_area / n_px
        f["main_offset"] = float(np.hypot(yy.mean() - (h - 1) / 2, xx.mean() - (w - 1) / 2)) / max(h, w)
        f["outside_share"] = (stained - main_area) / stained if stained else 0.0
    # the strongest candidate for a second cell: the largest other stained group
    # of any size (a platelet, a pale red cell or a real nucleus: the model decides)
    others = [i for i in r.groups if i != r.main]
    if others:
        areas = {i: int(counts[i]) for i in others}
        j = max(others, key=areas.get)
        f["second_share"] = areas[j] / n_px
        f["second_od"] = r.core[j]
        f["second_thick"] = float(r.dist[r.labels == j].max()) / max(h, w)
        f["other_share"] = sum(a for i, a in areas.items() if i in r.big) / n_px
    return np.array([f[k] for k in FEATURE_NAMES], dtype=np.float64)


def image_features(img: np.ndarray, params: dict | None = None) -> np.ndarray:
    """One preprocessed uint8 RGB image -> the FEATURE_NAMES vector."""
    return features_from_regions(find_regions(img, params))


# ----------------------------------------------------------------------------- model

# what the mixture sees: how big, how dark and how thick the strongest candidate
# for a second cell is (log area: platelets, pale red cells and nuclei span decades)
MODEL_INPUTS = ("second_share", "second_od", "second_thick")
_NO_SECOND_SCORE = -50.0   # no second stained group at all: as single as it gets


def _model_matrix(feats: np.ndarray) -> np.ndarray:
    idx = [FEATURE_NAMES.index(n) for n in MODEL_INPUTS]
    x = feats[:, idx].astype(np.float64)
    return np.c_[np.log10(x[:, 0] + 1e-3), x[:, 1], x[:, 2] * 10.0]


def _gauss_logpdf(x: np.ndarray, mean: np.ndarray, chol: np.ndarray, log_det: float) -> np.ndarray:
    """Log density of N(mean, chol chol^T); ``log_det`` = sum(log(diag(chol)))."""
    z = np.linalg.solve(chol, (x - mean).T)
    return -0.5 * (np.sum(z * z, 0) + len(mean) * np.log(2 * np.pi)) - log_det


class Screen:
    """Stain features + a Gaussian mixture over the second-cell candidates.

    Fitting uses no labels: the mixture clusters the images that have any second
    stained group; the component with the largest groups is the "extra cell"
    cluster. The score is the log posterior odds of that cluster (0 = even), so
    ``score > threshold`` flags an image as multi-cell."""

    def __init__(self, mixture: dict, threshold: float = 0.0, image_size: int = DEFAULT_IMAGE_SIZE,
                 params: dict | None = None, info: dict | None = None):
        self.mixture = {k: np.asarray(v, dtype=np.float64) if k != "multi_component" else int(v)
                        for k, v in mixture.items()}
        self.threshold = float(threshold)
        self.image_size = int(image_size)
        self.params = {**DEFAULT_PARAMS, **(params or {})}
        self.info = dict(info or {})
        # the components' Cholesky factors once, not per image (the screen scores every image)
        chols = [np.linalg.cholesky(c) for c in self.mixture["covariances"]]
        self._components = [(np.log(w), mu, ch, np.log(np.diag(ch)).sum())
                            for w, mu, ch in zip(self.mixture["weights"], self.mixture["means"], chols)]

    # -- fitting
    @classmethod
    def fit(cls, data, image_size: int = DEFAULT_IMAGE_SIZE, n_components: int = 3,
            threshold: float = 0.0, params: dict | None = None, seed: int = 0,
            cache_dir=None, progress: bool = True) -> "Screen":
        """Fit on a dataset folder (class sub-folders or a flat folder of images;
        labels, if any, are ignored) or on an array of preprocessed images."""
        if isinstance(data, np.ndarray):
            images, source = data, f"{len(data)} arrays"
        else:
            images, source = _load_folder(data, image_size, cache_dir, progress)
        feats = features_arrays(images, params, progress=progress)
        return cls.fit_features(feats, image_size, n_components, threshold, params, seed, source)

    @classmethod
    def fit_features(cls, feats: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE,
                     n_components: int = 3, threshold: float = 0.0, params: dict | None = None,
                     seed: int = 0, source: str = "features") -> "Screen":
        """Fit the mixture on an already computed feature matrix (``features_arrays``)."""
        from sklearn.mixture import GaussianMixture
        has = feats[:, FEATURE_NAMES.index("second_share")] > 0
        if has.sum() < 5 * n_components:
            raise ValueError(f"{source}: only {int(has.sum())} image(s) with a second stained group; "
                             f"need at least {5 * n_components} to fit the screen")
        gm = GaussianMixture(n_components, covariance_type="full", random_state=seed, n_init=3)
        gm.fit(_model_matrix(feats[has]))
        mixture = {"weights": gm.weights_, "means": gm.means_, "covariances": gm.covariances_,
                   "multi_component": int(np.argmax(gm.means_[:, 0]))}
        scr = cls(mixture, threshold, image_size, params)
        scores = scr.score_features(feats)
        scr.info = {"fitted_on": str(source), "n_images": int(len(feats)),
                    "n_with_second_group": int(has.sum()),
                    "share_flagged": float(np.mean(scores > threshold)),
                    "features": FEATURE_NAMES, "model_inputs": list(MODEL_INPUTS)}
        return scr

    # -- scoring
    def score_features(self, feats: np.ndarray) -> np.ndarray:
        feats = np.atleast_2d(feats)
        out = np.full(len(feats), _NO_SECOND_SCORE)
        has = feats[:, FEATURE_NAMES.index("second_share")] > 0
        if has.any():
            x = _model_matrix(feats[has])
            logp = np.stack([log_w + _gauss_logpdf(x, mu, chol, log_det)
                             for log_w, mu, chol, log_det in self._components], 1)
            k = self.mixture["multi_component"]
            rest = np.delete(logp, k, axis=1)
            odds = logp[:, k] - np.logaddexp.reduce(rest, axis=1)
            out[has] = np.clip(odds, _NO_SECOND_SCORE, -_NO_SECOND_SCORE)
        return out

    def score_arrays(self, images: Sequence[np.ndarray]) -> list[dict]:
        """Preprocessed uint8 RGB images (``preprocess(src, self.image_size)``) ->
        ``{"score", "n_regions", "multi_cell"}`` per image."""
        return [self.score_regions(find_regions(np.asarray(img), self.params)) for img in images]

    def score_regions(self, regions: Regions) -> dict:
        """:meth:`score_arrays` for an image already segmented (the framing's pass)."""
        f = features_from_regions(regions)
        s = float(self.score_features(f[None])[0])
        return {"score": round(s, 4), "n_regions": int(f[FEATURE_NAMES.index("n_regions")]),
                "multi_cell": bool(s > self.threshold)}

    def score_paths(self, paths: Iterable[ImageSource]) -> list[dict]:
        """Like ``score_arrays`` for files; a bad file gets ``status: skipped: <reason>``."""
        out = []
        for p in paths:
            name = str(p) if isinstance(p, (str, os.PathLike)) else f"<{type(p).__name__}>"
            try:
                img = preprocess(p, self.image_size)
            except ImageError as e:
                out.append({"path": name, "status": f"skipped: {e.reason}"})
                continue
            out.append({"path": name, "status": "ok", **self.score_arrays([img])[0]})
        return out

    def debug_image(self, src: ImageSource, out_png) -> dict:
        """Save the stain mask and regions of one image (see ``render_debug``); returns its record."""
        from .data import atomic_write_bytes
        img = preprocess(src, self.image_size)
        r = find_regions(img, self.params)
        s = float(self.score_features(features_from_regions(r)[None])[0])
        pic = render_debug(img, r, s, s > self.threshold, scale=max(1, 384 // self.image_size))
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        atomic_write_bytes(Path(out_png), buf.getvalue())
        return {"score": s, "n_regions": len(r.big), "multi_cell": s > self.threshold}

    # -- persistence (JSON only)
    def to_dict(self) -> dict:
        m = self.mixture
        return {"format": FORMAT, "image_size": self.image_size, "threshold": self.threshold,
                "params": self.params, "features": FEATURE_NAMES, "model_inputs": list(MODEL_INPUTS),
                "mixture": {"weights": m["weights"].tolist(), "means": m["means"].tolist(),
                            "covariances": m["covariances"].tolist(),
                            "multi_component": int(m["multi_component"])},
                "info": self.info}

    def save(self, path) -> Path:
        from .data import atomic_write_json
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path=None) -> "Screen":
        path = Path(path) if path is not None else BUNDLED_SCREEN
        if path.is_dir():
            path = path / "screen.json"
        if not path.exists():
            raise FileNotFoundError(f"no screen model at {path} (make one with `bloodcell screen-fit`)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a screen model (bad JSON: {e})") from None
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a screen model (format {d.get('format')!r}, want {FORMAT!r})")
        if d.get("features") != FEATURE_NAMES or d.get("model_inputs") != list(MODEL_INPUTS):
            raise ValueError(f"{path}: made with other features; refit it with `bloodcell screen-fit`")
        return cls(d["mixture"], d["threshold"], d["image_size"], d["params"], d.get("info"))


def features_arrays(images, params: dict | None = None, progress: bool = False) -> np.ndarray:
    """Feature matrix [N, len(FEATURE_NAMES)] for preprocessed uint8 images."""
    from tqdm import tqdm
    it = tqdm(range(len(images)), desc="stain features", unit="img", disable=not progress,
              mininterval=2.0)
    return np.stack([image_features(np.asarray(images[i]), params) for i in it]) if len(images) \
        else np.zeros((0, len(FEATURE_NAMES)))


def _load_folder(folder, image_size, cache_dir, progress):
    """Images of a folder: class sub-folders (through the shared cache) or loose files."""
    from . import data
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    if any(d.is_dir() and not d.name.startswith(".") for d in folder.iterdir()):
        ds = data.scan(folder)
        images, _ = data.load_images(ds, image_size, cache_dir=cache_dir, progress=progress)
        return images, folder
    files = [p for p, why in data.iter_image_files(folder) if why is None]
    if not files:
        raise ValueError(f"{folder}: no image files found")
    images, reasons = data.decode_many(files, image_size, workers=1, progress=progress)
    keep = [i for i, r in enumerate(reasons) if r is None]
    for f, r in zip(files, reasons):
        if r:
            log.warning("skipped %s: %s", f, r)
    return images[keep], folder


# ----------------------------------------------------------------------------- debug view

def render_debug(img: np.ndarray, regions: Regions, score: float | None = None,
                 flagged: bool | None = None, scale: int = 3):
    """A side-by-side picture (PIL image): the image with region outlines and centre
    marker | the stain mask coloured by region (central = green, other cell-size
    regions = red, small specks = grey)."""
    from PIL import Image, ImageDraw
    h, w = regions.mask.shape
    base = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
    # outlines: region pixels that border a non-region pixel
    lab = regions.labels
    colour = np.zeros((h, w, 3), np.uint8)
    colour[regions.mask] = (150, 150, 150)
    for i in regions.big:
        colour[lab == i] = (0, 200, 0) if i == regions.main else (230, 30, 30)
    edge = np.zeros((h, w), bool)
    for i in regions.big:
        m = lab == i
        edge |= m & ~ndi.binary_erosion(m)
    over = np.asarray(base).copy()
    big_edge = np.kron(edge, np.ones((scale, scale), bool))
    big_col = np.kron(colour, np.ones((scale, scale, 1), np.uint8))
    over[big_edge] = big_col[big_edge]
    left = Image.fromarray(over)
    right = Image.fromarray(big_col)
    out = Image.new("RGB", (2 * w * scale + 4, h * scale + 18), "white")
    out.paste(left, (0, 18))
    out.paste(right, (w * scale + 4, 18))
    d = ImageDraw.Draw(out)
    cx, cy = w * scale / 2, h * scale / 2 + 18
    for dx, dy in ((8, 0), (0, 8)):
        d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=(0, 0, 255), width=2)
    text = f"regions: {len(regions.big)}"
    if score is not None:
        text += f"   score: {score:.2f}"
    if flagged is not None:
        text += "   MULTI-CELL" if flagged else "   single"
    d.text((4, 3), text, fill=(0, 0, 0))
    return out
