"""A compact copy of an image folder, for moving a dataset to a training machine that
takes only small uploads (a lent GPU here takes 64 MiB per call).

Every image gets bloodcell's own preprocessing at the training size (the centre square,
resized: ``transforms.preprocess``), so training on the copy at that size decodes the
same pixels up to the re-encoding, and is saved as WebP at ``--quality`` under the same
relative path and file name (the split manifest and the predictions key on paths; PIL
reads a file by its content, not its extension). At 224 px and quality 90 the copy of
PBC is ~72 MB (6 KB an image) and differs from the originals' pixels by ~1.8 grey levels
on average, about what a JPEG at quality 90 adds. ``--parts N`` spreads the files over
N folders of about equal size, one per upload.

    python scripts/compact_copy.py ../shared/data/pbc .gpu/pbc --size 224 --parts 2

Hidden and undecodable files are left out (bloodcell skips them too). Score models on
the original images; the study report built from a run on a copy says so (docs/study/notes.md:
what the copy cost each generation). `benchmarks/pack_for_device.py` is the older, narrower
pack of the recipe experiments (train + val only, new .webp names and manifest, Lite0 weights).
"""
from __future__ import annotations

import argparse
import io
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from bloodcell.data import iter_image_files
from bloodcell.transforms import ImageError, preprocess


def _one(args) -> tuple[str, int]:
    src, dst, size, quality = args
    try:
        arr = preprocess(src, size)
    except ImageError as e:
        return f"{src}: skipped ({e.reason})", 0
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "WEBP", quality=quality, method=6)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())
    return "", buf.tell()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="dataset folder (class sub-folders)")
    ap.add_argument("dst", type=Path, help="where the copy goes (part folders dst/part1... with --parts)")
    ap.add_argument("--size", type=int, default=224, help="training image size (default 224)")
    ap.add_argument("--quality", type=int, default=90, help="WebP quality (default 90)")
    ap.add_argument("--parts", type=int, default=1, help="spread over N folders (default 1)")
    a = ap.parse_args(argv)
    if not a.src.is_dir():
        raise SystemExit(f"{a.src}: not a folder")
    jobs = []
    for p, reason in iter_image_files(a.src):
        if reason:
            print(f"{p}: skipped ({reason})")
            continue
        rel = p.relative_to(a.src)
        part = zlib.crc32(str(rel).encode()) % a.parts  # stable: the same file, the same part
        root = a.dst / f"part{part + 1}" / a.src.name if a.parts > 1 else a.dst
        jobs.append((p, root / rel, a.size, a.quality))
    total = 0
    with ProcessPoolExecutor() as ex:
        for msg, n in ex.map(_one, jobs, chunksize=64):
            if msg:
                print(msg)
            total += n
    print(f"{len(jobs)} images -> {a.dst} ({total / 2**20:.1f} MiB, {a.size} px, WebP quality {a.quality})")


if __name__ == "__main__":
    main()
