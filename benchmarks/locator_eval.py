"""The cell locator (bloodcell.locate), measured:

1. on PBC: how large the located nucleus is (extent = largest side of its bounding
   box / image side) per class, and how often a nucleus is found -- the distribution
   that ``Framing.target`` is chosen from;
2. on the CellaVision-blog images of other labs, against their hand-drawn masks
   (255 = nucleus): centre error (distance between the located box centre and the
   mask nucleus' box centre, / image side) and size error (located extent / mask extent).

    .venv/bin/python benchmarks/locator_eval.py [--per-class 60] [--seed 0]

Reads ../shared/data/pbc and ../shared/data/wbc_cellavision(_masks); images are
located at the framing's working size (128 px), as the preprocessing does.
"""
import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.data import default_data_dir, iter_image_files
from bloodcell.locate import Framing, locate_image
from bloodcell.transforms import preprocess


def mask_box(mask: np.ndarray):
    """(cx, cy, extent) of the nucleus (255) in a mask, fractions of the side."""
    yy, xx = np.nonzero(mask == 255)
    h, w = mask.shape
    ext = max(yy.max() - yy.min() + 1, xx.max() - xx.min() + 1) / max(h, w)
    return (xx.min() + xx.max() + 1) / 2 / w, (yy.min() + yy.max() + 1) / 2 / h, ext


def pbc_table(root: Path, per_class: int, seed: int, ws: int):
    rng = np.random.default_rng(seed)
    print(f"PBC ({root}), {per_class} random images per class, located at {ws} px")
    print("| class | nucleus found | extent median | 5th-95th pct |")
    print("|---|---:|---:|---|")
    all_ext, t = [], 0.0
    for cls in sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files = sorted(p for p, why in iter_image_files(root / cls) if why is None)
        pick = [files[i] for i in rng.permutation(len(files))[:per_class]]
        boxes = []
        for p in pick:
            work = preprocess(p, ws)
            t0 = time.perf_counter()
            boxes.append(locate_image(work))
            t += time.perf_counter() - t0
        ext = np.array([b.extent for b in boxes if b.found])
        all_ext += list(ext)
        q = np.percentile(ext, [5, 50, 95]) if len(ext) else [np.nan] * 3
        print(f"| {cls} | {len(ext)}/{len(boxes)} | {q[1]:.3f} | {q[0]:.3f}-{q[2]:.3f} |")
    q = np.percentile(all_ext, [5, 50, 95])
    print(f"| all | {len(all_ext)} | {q[1]:.3f} | {q[0]:.3f}-{q[2]:.3f} |")
    print(f"locator time: {1000 * t / max(1, per_class * 8):.2f} ms/image (segmentation included)\n")


def wbc_table(root: Path, masks: Path, ws: int):
    centre, size, missed = [], [], []
    for p in sorted(root.rglob("*.bmp")):
        m = np.asarray(Image.open(masks / f"{p.stem}.png").convert("L").resize((ws, ws), Image.NEAREST))
        cx, cy, ext = mask_box(m)
        b = locate_image(preprocess(p, ws))
        if not b.found:
            missed.append(p.name)
            continue
        centre.append(np.hypot(b.cx - cx, b.cy - cy))
        size.append(b.extent / ext)
    c, s = np.array(centre), np.array(size)
    print(f"Other labs ({root}, {len(c) + len(missed)} images, hand-drawn masks)")
    print(f"nucleus found: {len(c)}/{len(c) + len(missed)} {missed if missed else ''}")
    print(f"centre error / side: median {np.median(c):.3f}, 90th pct {np.percentile(c, 90):.3f}, "
          f"max {c.max():.3f}")
    print(f"size ratio located/mask: median {np.median(s):.3f}, 10th-90th pct "
          f"{np.percentile(s, 10):.3f}-{np.percentile(s, 90):.3f}")
    return c, s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="PBC folder (default ../shared/data/pbc)")
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    pbc = Path(a.data or default_data_dir())
    ws = Framing().work_size
    pbc_table(pbc, a.per_class, a.seed, ws)
    wbc_table(pbc.parent / "wbc_cellavision", pbc.parent / "wbc_cellavision_masks", ws)


if __name__ == "__main__":
    main()
