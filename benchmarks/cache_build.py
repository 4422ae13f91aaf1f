"""Decoded-image cache: time of the first build and of a cached load.

    .venv/bin/python benchmarks/cache_build.py [--data ../shared/data/pbc] [--sizes 128,224]

Builds into a fresh temporary cache folder (your real cache is untouched), then
scans + loads again (what every later run pays). Prints a markdown table.
"""
import argparse
import tempfile
import time
from pathlib import Path

from bloodcell import data as D


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(D.default_data_dir() or "../shared/data/pbc"))
    ap.add_argument("--sizes", default="128,224")
    a = ap.parse_args()
    print("| size | images | scan+hash s | first build s | cached scan+load s | cache MB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in map(int, a.sizes.split(",")):
            t = time.perf_counter()
            ds = D.scan(a.data)
            scan_s = time.perf_counter() - t
            _, info = D.load_images(ds, size, Path(tmp), progress=False)
            assert info["built"]
            t = time.perf_counter()
            ds2 = D.scan(a.data)
            arr, info2 = D.load_images(ds2, size, Path(tmp), progress=False)
            arr[-1].sum()  # touch the memory map
            load_s = time.perf_counter() - t
            mb = Path(info["cache_file"]).stat().st_size / 1e6
            print(f"| {size} | {len(ds2)} | {scan_s:.1f} | {info['seconds']:.1f} | {load_s:.1f} | {mb:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
