"""Pack the train+val images of a split, the Lite0 ImageNet weights and the
split manifest into one small folder that can travel to a lent GPU machine
(the device tool carries at most 64 MiB, the dataset is 212 MB).

Images are centre-cropped, resized to --size and re-encoded as WebP (lossy:
a run on them is compared with runs on the same pack, not with CPU runs on
the original JPEGs). Test images are never packed, so nothing run on the
device can touch the test split. Used for docs/experiments.md rows 20+:

    python benchmarks/pack_for_device.py --split runs/recipe-s42/split.csv --out .gpu
    # on the device:  bloodcell train --data .gpu/pbc --split-file .gpu/split.csv \
    #                   --weights .gpu/lite0.safetensors ...
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

from bloodcell.data import atomic_write_bytes, default_data_dir
from bloodcell.models import lite_weights_path, load_state_dict_file
from bloodcell.transforms import preprocess


def _encode(job):
    src, dst, size, quality = job
    import io
    buf = io.BytesIO()
    Image.fromarray(preprocess(src, size)).save(buf, "WEBP", quality=quality, method=6)
    atomic_write_bytes(Path(dst), buf.getvalue())
    return len(buf.getvalue())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="default: ../shared/data/pbc")
    ap.add_argument("--split", required=True, help="split.csv of a run (its test rows are left out)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--variants", default="lite0",
                    help="EfficientNet-Lite ImageNet weights to pack, comma-separated (lite0,lite1,lite2)")
    args = ap.parse_args(argv)

    out, data = Path(args.out), Path(args.data or default_data_dir())
    with open(args.split, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] != "test"]
    jobs, manifest = [], []
    for r in rows:
        rel = str(Path(r["path"]).with_suffix(".webp"))
        (out / "pbc" / rel).parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(data / r["path"]), str(out / "pbc" / rel), args.size, args.quality))
        manifest.append({**r, "path": rel})
    with ProcessPoolExecutor() as ex:
        total = sum(ex.map(_encode, jobs, chunksize=64))
    with open(out / "split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(manifest[0]))
        w.writeheader()
        w.writerows(manifest)
    for variant in args.variants.split(","):
        # fp16 and without the ImageNet classifier: a third of the original file
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous()
              for k, v in load_state_dict_file(lite_weights_path(variant)).items() if not k.startswith("_fc.")}
        save_file(sd, str(out / f"{variant}.safetensors"))
    # one archive: the device tool's size limit counts small files badly
    with tarfile.open(out / "pbc.tgz", "w:gz") as tar:
        tar.add(out / "pbc", arcname="pbc")
    shutil.rmtree(out / "pbc")
    weights = sum((out / f"{v}.safetensors").stat().st_size for v in args.variants.split(","))
    print(f"{len(jobs)} images ({total / 2**20:.1f} MiB) at {args.size} px, weights "
          f"{weights / 2**20:.1f} MiB -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
