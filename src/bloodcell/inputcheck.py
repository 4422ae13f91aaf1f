"""Input checks: is an image like the ones the model was trained on?

A classifier answers with one of its eight classes whatever it is shown: a blank
frame, a grayscale scan, a photo of something else or a smear stained in another
lab all come back as some cell type, often with high confidence. These checks
catch such inputs cheaply and say what is wrong, so that the record is sent to
review and left out of the differential count instead of silently counted:

- *colour statistics*: the per-channel mean and spread of the preprocessed image
  (6 numbers) against those of the training images, as a Mahalanobis distance; the
  threshold is the distance that ``quantile`` (99.9 %) of the training images stay
  under, so about 1 in 1,000 in-distribution images is flagged. Fitted by
  ``bloodcell calibrate`` and stored in model.json as ``input_check``.
- *no colour* (grayscale) and *blank* (nearly uniform) images, named as such;
- *geometry*: images smaller than the model input (upscaled) and far from square
  (only the centre square is classified); multi-page files (only the first page).

The checks look at the same preprocessed array the model sees
(:func:`bloodcell.transforms.preprocess_with_info`), so they cannot drift from it.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .modelfile import ModelFile

FEATURES = ["mean R", "mean G", "mean B", "sd R", "sd G", "sd B"]
DEFAULT_QUANTILE = 0.999
MAX_ASPECT = 1.25      # PBC crops are 360x363; wider images lose their sides to the centre crop
GRAY_SPREAD = 4.0      # mean (max - min) over the channels, 0..255: below this the image has no colour
BLANK_SD = 3.0         # sd of the grey level, 0..255: below this the image is uniform


def _stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [N, S, S, 3] -> (colour features [N, 6], mean channel spread [N], sd of grey [N]).
    On a grid of every 4th pixel of every 4th row (1,024 of a 128 px image): these are
    whole-image statistics, and vectorised over a batch they cost ~1 % of prediction time."""
    a = np.asarray(images)
    # channel planes [N, 3, P]: numpy reduces long contiguous rows fast, axes of 3 slowly
    x = np.ascontiguousarray(a[:, ::4, ::4].reshape(len(a), -1, 3).transpose(0, 2, 1), dtype=np.float32)
    mean = x.mean(2)
    sd = np.sqrt(np.maximum((x * x).mean(2) - mean ** 2, 0.0))
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    spread = (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).mean(1)
    grey_sd = (r + g + b).std(1) / 3
    return np.concatenate([mean, sd], 1).astype(np.float64), spread, grey_sd


def colour_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] (or one [S, S, 3]) -> float64 [N, 6]: per-channel mean and sd."""
    a = np.asarray(images)
    return _stats(a[None] if a.ndim == 3 else a)[0]


def fit_input_check(images: np.ndarray, index: np.ndarray | None = None,
                    quantile: float = DEFAULT_QUANTILE, batch: int = 512, predictive: bool = False) -> dict:
    """Colour statistics of (training) images -> the ``input_check`` entry of model.json.
    ``index`` picks rows of ``images`` (read in batches: it may be a large memory map).

    ``predictive``: for a handful of images (``bloodcell adapt``), where the largest
    distance seen says little about the next image and the covariance itself is
    uncertain, the threshold is at least the ``quantile`` of a new image's distance
    under a Gaussian with estimated mean and covariance (Hotelling's prediction
    bound: d^2 ~ p(n+1)(n-1)/(n(n-p)) F(p, n-p)); it tends to the chi bound as n grows."""
    index = np.arange(len(images)) if index is None else np.asarray(index)
    if len(index) < 2 * len(FEATURES):
        raise ValueError(f"need at least {2 * len(FEATURES)} images to fit the input check, got {len(index)}")
    f = np.concatenate([colour_features(images[index[i:i + batch]]) for i in range(0, len(index), batch)])
    mean, cov = f.mean(0), np.cov(f.T)
    cov += np.eye(len(FEATURES)) * 1e-6 * np.trace(cov)  # never singular (e.g. constant channels)
    d = _mahalanobis(f, mean, np.linalg.inv(cov))
    threshold = float(np.quantile(d, quantile))
    if predictive:
        threshold = max(threshold, _prediction_bound(len(f), len(FEATURES), quantile))
    return {"features": FEATURES, "mean": mean.tolist(), "cov": cov.tolist(),
            "quantile": quantile, "threshold": threshold, "n_images": int(len(f)),
            **({"threshold_rule": "max(empirical quantile, Hotelling prediction bound)"} if predictive else {})}


def _prediction_bound(n: int, p: int, quantile: float) -> float:
    """Mahalanobis distance a new Gaussian draw stays under with probability ``quantile``
    when mean and covariance were estimated from n draws (n > p)."""
    from scipy.stats import f as f_dist
    return float(np.sqrt(p * (n + 1) * (n - 1) / (n * (n - p)) * f_dist.ppf(quantile, p, n - p)))


def _mahalanobis(f: np.ndarray, mean: np.ndarray, cov_inv: np.ndarray) -> np.ndarray:
    d = f - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, cov_inv, d), 0.0))


class InputCheck:
    """Warnings for one preprocessed image; ``stats`` is model.json's ``input_check``
    (None: only the grayscale, blank and geometry checks run)."""

    def __init__(self, stats: dict | None, image_size: int):
        self.stats = stats
        self.image_size = int(image_size)
        if stats is not None:
            if list(stats.get("features", [])) != FEATURES:
                raise ValueError(f"input_check was fitted on other features: {stats.get('features')}")
            self.mean = np.asarray(stats["mean"], np.float64)
            self.cov_inv = np.linalg.inv(np.asarray(stats["cov"], np.float64))
            self.threshold = float(stats["threshold"])
        # an adapted model knows its lab's image size: that is not "small" for it
        self.small_side = min(self.image_size, int((stats or {}).get("min_side", self.image_size)))

    @classmethod
    def from_meta(cls, meta: ModelFile) -> "InputCheck":
        return cls(meta.input_check, meta.image_size)

    def fingerprint(self) -> str | None:
        """Changes whenever the fitted statistics change (a resumed run re-checks then)."""
        if self.stats is None:
            return None
        return hashlib.sha1(json.dumps(self.stats, sort_keys=True).encode()).hexdigest()[:12]

    def distance(self, images: np.ndarray) -> np.ndarray:
        if self.stats is None:
            raise ValueError("no colour statistics: fit them with `bloodcell calibrate`")
        return _mahalanobis(colour_features(images), self.mean, self.cov_inv)

    def warnings(self, image: np.ndarray, source: tuple | None = None) -> list[str]:
        """[] for an ordinary image, else one short reason per problem found. ``source``:
        a transforms.SourceInfo, or (width, height), of the input before preprocessing."""
        return self.warnings_batch(np.asarray(image)[None], [source])[0]

    def _colour_verdicts(self, images: np.ndarray):
        """-> (distance or None, far from the training colours, grayscale, blank), per image."""
        feats, spread, grey_sd = _stats(images)
        dist = None if self.stats is None else _mahalanobis(feats, self.mean, self.cov_inv)
        gray, blank = spread < GRAY_SPREAD, grey_sd < BLANK_SD
        far = np.zeros(len(feats), bool) if dist is None else (dist > self.threshold) & ~gray & ~blank
        return dist, far, gray, blank

    def unlike(self, images: np.ndarray) -> np.ndarray:
        """bool [N]: stained colour images whose colours are unlike the training images'
        (another lab's stain or scanner): the "colours unlike" warning, without the text."""
        return self._colour_verdicts(np.asarray(images))[1]

    def warnings_batch(self, images: np.ndarray,
                       sources: list[tuple | None] | None = None) -> list[list[str]]:
        """:meth:`warnings` for a batch of preprocessed images [N, S, S, 3] (vectorised)."""
        dist, far, gray, blank = self._colour_verdicts(images)
        out = []
        for i, source in enumerate(sources or [None] * len(far)):
            w = []
            if gray[i]:
                w.append("no colour (grayscale image); the model was trained on stained colour images")
            if blank[i]:
                w.append("blank image (nearly uniform)")
            if far[i]:
                w.append(f"colours unlike the training images (distance {dist[i]:.1f} > {self.threshold:.1f}): "
                         "another stain or scanner, or not a blood-cell image?")
            if source is not None:
                iw, ih = source[0], source[1]
                frames = source[2] if len(source) > 2 else 1
                if frames > 1:
                    w.append(f"{frames} frames or pages: only the first was classified")
                if min(iw, ih) < self.small_side:
                    w.append(f"small image ({iw}x{ih} px, upscaled to {self.image_size})")
                if max(iw, ih) > MAX_ASPECT * min(iw, ih):
                    w.append(f"not square ({iw}x{ih} px): only the centre square was classified")
            out.append(w)
        return out
