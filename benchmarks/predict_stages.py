"""Where `bloodcell predict`'s CPU goes, stage by stage, on one thread: decode +
preprocess, the multi-cell screen (segmentation, features, mixture score), the model
(ONNX Runtime, one thread, several batch sizes), the input checks and the records.

    python benchmarks/predict_stages.py [-n 1000] [--data DIR] [--backend onnx]

CPU time of this thread (``time.thread_time``), so other jobs on the machine slow the
figures down less than wall time (they still share caches and cores); the model runs
on one ONNX Runtime thread, the calling one, so its time is counted here too.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_throughput import files_of  # noqa: E402

from bloodcell.cpu import describe  # noqa: E402
from bloodcell.data import default_data_dir  # noqa: E402
from bloodcell.predict import Classifier  # noqa: E402
from bloodcell.screen import features_from_regions  # noqa: E402
from bloodcell.segment import find_regions  # noqa: E402
from bloodcell.transforms import preprocess_with_info  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--data", help="image folder (default ../shared/data/pbc)")
    ap.add_argument("--backend", default="onnx")
    a = ap.parse_args()
    data = Path(a.data) if a.data else default_data_dir()
    files = files_of(data, a.n)
    for f in files:  # warm the page cache
        f.read_bytes()
    clf = Classifier.load(None, backend=a.backend, threads=1)
    scr = clf.screen
    cpu: dict[str, float] = {}

    def timed(stage, fn, *args):
        t = time.thread_time()
        out = fn(*args)
        cpu[stage] = cpu.get(stage, 0.0) + time.thread_time() - t
        return out

    images, sources = [], []
    for f in files:
        img, info = timed("decode + preprocess", preprocess_with_info, f, clf.image_size)
        regions = timed("screen: segmentation", find_regions, img, scr.params)
        feats = timed("screen: features", features_from_regions, regions)
        timed("screen: mixture score", scr.score_features, feats[None])
        images.append(img)
        sources.append(info)
    x = np.stack(images)
    for bs in (32, 64, 128):
        clf.predict_proba_arrays(x[:bs])  # warm-up
        timed(f"model, batch {bs} ({a.backend}, 1 thread)",
              lambda: [clf.predict_proba_arrays(x[i:i + bs]) for i in range(0, len(x), bs)])
    timed("input checks (batch 64)",
          lambda: [clf.check_inputs(x[i:i + 64], sources[i:i + 64]) for i in range(0, len(x), 64)])
    probs = clf.predict_proba_arrays(x[:64])
    timed("records (batch 64)", lambda: [clf.records(["f"] * 64, probs, [None] * 64, [[]] * 64, [None] * 64)
                                         for _ in range(0, len(x), 64)])
    print(f"{len(files)} files of {data}; {describe()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| stage | CPU ms/image |\n|---|---:|")
    for stage, s in cpu.items():
        print(f"| {stage} | {1000 * s / len(files):.2f} |")


if __name__ == "__main__":
    main()
