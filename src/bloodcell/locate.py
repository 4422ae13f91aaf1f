"""Cell-centred framing: find the cell of interest and frame it the way PBC does.

Other labs' analysers and cameras frame cells differently (the cell fills more or
less of the image, off centre), and a classifier trained on one framing reads
scale as class (a zoomed-out cell looks like a platelet). So the preprocessing
locates the cell's nucleus with the screen's stain segmentation (one pass serves
both) and crops a square centred on it, sized so that the nucleus spans the same
fraction of the frame whatever the magnification.

Measured on PBC (``benchmarks/locator_eval.py``; 60 images per class, 128 px):
the nucleus extent (largest side of its bounding box / image side) has median
0.32 (5th-95th percentile 0.16-0.43; lymphocyte 0.28, monocyte 0.39, platelet
clumps 0.14); the CellaVision-blog images of other labs: 0.42. Framing to
``target = 0.40`` zooms PBC cells in a little (more pixels on the cell at the
same input size) and rarely needs padding; no nucleus found (most platelet
images) keeps the whole image, and the record says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .segment import Regions, find_regions


@dataclass(frozen=True)
class CellBox:
    """The located cell in a square working image: centre and nucleus extent as
    fractions of the side; ``found`` False means no nucleus was found."""
    cx: float = 0.5
    cy: float = 0.5
    extent: float = 0.0
    found: bool = False


def locate(regions: Regions) -> CellBox:
    """The central nucleated cell of a segmented image (the screen's ``main`` region)."""
    if not regions.main:
        return CellBox()
    h, w = regions.labels.shape
    yy, xx = np.nonzero(regions.labels == regions.main)
    extent = max(int(yy.max() - yy.min()) + 1, int(xx.max() - xx.min()) + 1) / max(h, w)
    # the box centre, not the centroid: a lobed nucleus' centroid leans to its heavy side.
    # (Against the hand-drawn masks the centroid errs less at the 90th percentile, 0.03 vs
    # 0.06 of the side; changing it changes the preprocessing, so only with a retrained model.)
    cy = (yy.min() + yy.max() + 1) / 2 / h
    cx = (xx.min() + xx.max() + 1) / 2 / w
    return CellBox(float(cx), float(cy), float(extent), True)


def locate_image(work: np.ndarray, params: dict | None = None) -> CellBox:
    """:func:`locate` on a square uint8 RGB working image."""
    return locate(find_regions(work, params))


@dataclass(frozen=True)
class Framing:
    """How the preprocessing frames a located cell (stored in model.json).

    ``target``: nucleus extent / frame side after framing. ``work_size``: side of
    the square the locator looks at (the screen's size, so one segmentation
    serves both). ``min_side``/``max_side``: limits of the crop side as a
    fraction of the image's centre square, so a mis-located speck or a huge
    smudge cannot zoom absurdly. ``power`` < 1 normalises the scale only in part:
    the framed nucleus extent is ``target * (extent / ref) ** (1 - power)``, so a
    nucleus of PBC's median extent ``ref`` lands at ``target`` and size stays
    partly a cue (full normalisation, power 1, makes a lymphocyte's nucleus as big
    as a monocyte's: monocyte recall fell to 0.94 on PBC)."""
    target: float = 0.40
    work_size: int = 128
    min_side: float = 0.25
    max_side: float = 3.0
    power: float = 1.0
    ref: float = 0.32

    def crop_box(self, cell: CellBox) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in fractions of the centre square's side;
        may reach outside 0..1 (the caller pads with the background colour)."""
        if not cell.found:
            return 0.0, 0.0, 1.0, 1.0
        side = (self.ref / self.target) * (cell.extent / self.ref) ** self.power
        side = float(np.clip(side, self.min_side, self.max_side))
        return (cell.cx - side / 2, cell.cy - side / 2, cell.cx + side / 2, cell.cy + side / 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Framing | None":
        return cls(**d) if d else None

    @classmethod
    def of_config(cls, framing: bool | dict | None) -> "Framing | None":
        """A training config's framing: False/None none, True the default, a dict its fields."""
        if not framing:
            return None
        return cls(**framing) if isinstance(framing, dict) else cls()

    @classmethod
    def of_model(cls, meta) -> "Framing | None":
        """A model's framing from its ``modelfile.ModelFile`` (None: an older model, no framing)."""
        return cls.from_dict((meta.preprocess or {}).get("framing"))
