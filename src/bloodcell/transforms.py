"""Image decoding and preprocessing: the ONE definition shared by training,
evaluation, prediction and the server (train/serve skew is the classic bug).

An input (path, bytes, PIL image or array) becomes a square uint8 RGB array
of ``size`` x ``size``; models take that as float 0..255 (NCHW) and normalise
inside themselves, so exported models carry their own normalisation.
Training-time augmentation (batch-level torch ops) is in ``tensorops``.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps

from .locate import CellBox, Framing, locate
from .segment import Regions, find_regions

# Bump when the decoding/resizing below changes: caches and models record it.
PREPROCESS_VERSION = 1
PREPROCESS_DESCRIPTION = (
    "decode (JPEG draft mode down to >= 2x target), EXIF orientation, RGB "
    "(alpha composited on white, 16-bit scaled), centre crop to square, "
    "bilinear antialiased resize to size x size, uint8; model input is float 0..255 NCHW"
)
# PIL's own bomb check only warns below 2x its limit; we make it a clear error.
MAX_PIXELS = 60_000_000

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageError(ValueError):
    """An input that is not a usable image; ``source`` names it, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        self.source, self.reason = str(source), reason
        super().__init__(f"{source}: {reason}")


def _describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return f"<{type(src).__name__}>"


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        im = Image.fromarray(_float_to_uint8(np.asarray(im, dtype=np.float64)), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # slides are bright: white, not black
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def _float_to_uint8(a: np.ndarray, name: str = "<image>") -> np.ndarray:
    """Float pixels -> uint8: 0..1 when nothing exceeds 1 (the scikit-image and
    matplotlib convention), else 0..255. NaN or infinite pixels are refused."""
    if a.size and not np.isfinite(a).all():
        raise ImageError(name, "array has NaN or infinite values")
    if a.size and float(a.max()) <= 1.0:
        a = a * 255.0
    return np.clip(a + 0.5, 0, 255).astype(np.uint8)


def open_image(src: ImageSource, draft_size: int | None = None) -> Image.Image:
    """Decode ``src`` to an RGB PIL image, or raise ImageError saying why not."""
    return _open_image(src, draft_size)[0]


class SourceInfo(NamedTuple):
    """The input as it was before preprocessing (for the input checks)."""
    width: int
    height: int
    frames: int = 1  # animated GIF, multi-page TIFF: only the first frame is used


def _open_image(src: ImageSource, draft_size: int | None = None) -> tuple[Image.Image, SourceInfo]:
    """open_image, and the input's size before draft-mode decoding shrank it."""
    name = _describe(src)
    size0 = None
    try:
        if isinstance(src, Image.Image):
            im = src
        elif isinstance(src, np.ndarray):
            a = src
            if a.ndim == 3 and a.shape[2] == 1:
                a = a[:, :, 0]
            if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
                raise ImageError(name, f"array of shape {a.shape} is not HxW, HxWx3 or HxWx4")
            if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
                raise ImageError(name, f"array of dtype {a.dtype} is not an image")
            if a.dtype != np.uint8:
                if np.issubdtype(a.dtype, np.floating):
                    a = _float_to_uint8(a, name)
                elif a.dtype.itemsize == 2 and a.size and int(a.max()) > 255:
                    a = (a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)  # 16-bit 0..65535
                else:
                    a = np.clip(a, 0, 255).astype(np.uint8)
            im = Image.fromarray(a)
        else:
            if isinstance(src, (bytes, bytearray)):
                if not src:
                    raise ImageError(name, "empty data (0 bytes)")
                fp = io.BytesIO(src)
            else:
                p = Path(src)
                if not p.exists():
                    raise ImageError(name, "no such file")
                if p.is_dir():
                    raise ImageError(name, "is a folder, not an image file")
                if p.stat().st_size == 0:
                    raise ImageError(name, "empty file (0 bytes)")
                fp = p
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(fp)
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(
                    name,
                    f"image too large ({im.width}x{im.height} pixels, limit {MAX_PIXELS:,}): "
                    "refusing a possible decompression bomb",
                )
            size0 = im.size  # before draft mode shrinks it
            if draft_size and im.format == "JPEG":
                # Decode at reduced scale straight from the DCT: 2-4x faster and,
                # since training uses the very same call, no skew.
                im.draft("RGB", (2 * draft_size, 2 * draft_size))
            im.load()
        if im.width * im.height > MAX_PIXELS:
            raise ImageError(name, f"image too large ({im.width}x{im.height} pixels, limit {MAX_PIXELS:,})")
        if im.width < 8 or im.height < 8:
            raise ImageError(name, f"image too small ({im.width}x{im.height} pixels, need at least 8x8)")
        size0 = size0 or im.size
        orientation = im.getexif().get(0x0112, 1)
        if orientation != 1:  # rotated by the camera (exif_transpose copies always)
            im = ImageOps.exif_transpose(im)
            if orientation in (5, 6, 7, 8):
                size0 = size0[::-1]
        return _to_rgb(im), SourceInfo(*size0, frames=int(getattr(im, "n_frames", 1) or 1))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own check fires before ours on the largest images: the same words, our limit
        raise ImageError(name, f"image too large (over {MAX_PIXELS:,} pixels): refusing a possible "
                               "decompression bomb") from None
    except Image.UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised file format)") from None
    except (PermissionError, IsADirectoryError) as e:  # the file is fine; we may not read it
        raise ImageError(name, f"cannot read the file ({e.strerror or e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(name, f"corrupt or truncated image ({e})") from None


def preprocess(src: ImageSource, size: int, framing: Framing | None = None) -> np.ndarray:
    """The preprocessing: any input -> uint8 array (size, size, 3); ``framing``
    (a model's, from model.json) centres and scales the located cell."""
    if framing is not None:
        return prepare(src, size, framing).image
    return preprocess_with_info(src, size)[0]


def preprocess_with_info(src: ImageSource, size: int) -> tuple[np.ndarray, SourceInfo]:
    """:func:`preprocess`, and what the input was (size, frames) for the input checks."""
    im, info = _open_image(src, draft_size=size)
    w, h = im.size
    s = min(w, h)
    if w != h:  # CellaVision crops centre the cell: keep the centre square
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8), info


class Prepared(NamedTuple):
    """One input, preprocessed for a model that frames cells (:func:`prepare`)."""
    image: np.ndarray              # the model's input, uint8 (size, size, 3)
    source: SourceInfo             # the input before preprocessing (input checks)
    work: np.ndarray | None        # the centre square at framing.work_size: the screen's input
    regions: Regions | None        # its stain segmentation (shared with the screen)
    cell: CellBox | None           # where the cell was found (cell.found False: whole image used)


def prepare(src: ImageSource, size: int, framing: Framing | None = None) -> Prepared:
    """The preprocessing of a model: :func:`preprocess_with_info` for models without
    framing; for framing models, locate the cell on the centre square at the
    working size, then crop a square centred on it whose side puts the nucleus at
    ``framing.target`` of the frame, padded with the slide's background colour."""
    if framing is None:
        img, info = preprocess_with_info(src, size)
        return Prepared(img, info, None, None, None)
    im, info = _open_image(src, draft_size=size)
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    ws = framing.work_size
    work = np.asarray(im.resize((ws, ws), Image.BILINEAR, box=(left, top, left + s, top + s)),
                      dtype=np.uint8)
    regions = find_regions(work)
    cell = locate(regions)
    x0, y0, x1, y1 = framing.crop_box(cell)
    box = (left + x0 * s, top + y0 * s, left + x1 * s, top + y1 * s)
    return Prepared(_crop_resize(im, box, size, work), info, work, regions, cell)


def _crop_resize(im: Image.Image, box, size: int, work: np.ndarray) -> np.ndarray:
    """``box`` of ``im`` (may reach outside it) resized to size x size, antialiased;
    outside the image: the background colour (the brightest pixels, as the
    stain segmentation's optical density takes it)."""
    x0, y0, x1, y1 = box
    w, h = im.size
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        pl, pt = max(0, math.ceil(-x0)), max(0, math.ceil(-y0))
        pr, pb = max(0, math.ceil(x1 - w)), max(0, math.ceil(y1 - h))
        bg = tuple(int(v) for v in np.percentile(work.reshape(-1, 3), 99, axis=0))
        canvas = Image.new("RGB", (w + pl + pr, h + pt + pb), bg)
        canvas.paste(im, (pl, pt))
        im, box = canvas, (x0 + pl, y0 + pt, x1 + pl, y1 + pt)
    return np.asarray(im.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)


# The torch side (tensor conversion, in-model normalisation and augmentation) lives in
# tensorops: decoding needs no torch, so `bloodcell predict` on ONNX Runtime never
# imports it. The old names still resolve here, on first use.
_TORCH_NAMES = ("to_tensor", "Normalize", "Augment")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from . import tensorops
        return getattr(tensorops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
