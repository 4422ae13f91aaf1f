"""Static int8 ONNX vs float32 ONNX for a saved model: validation accuracy (same
split as the run) and model-only images/s (preprocessed uint8 batches, so decoding
is not in the figure). Says whether int8 would buy speed without costing accuracy.

    BLOODCELL_CACHE=... .venv/bin/python benchmarks/onnx_int8.py [RUN_DIR] [--calib-images 300]

The int8 file is calibrated on training images of the run's split (never val/test)
and written to a temporary folder.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bloodcell import data as D
from bloodcell.export import export, quantize_int8, train_images
from bloodcell.predict import Classifier


def images_per_s(clf: Classifier, x: np.ndarray, batch: int, repeats: int = 3) -> float:
    clf.predict_logits_arrays(x[:batch])  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            clf.predict_logits_arrays(x[i:i + batch])
        best = max(best, len(x) / (time.perf_counter() - t0))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", default="runs/recipe-s42")
    ap.add_argument("--data", default=str(D.default_data_dir() or "../shared/data/pbc"))
    ap.add_argument("--calib-images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--speed-images", type=int, default=512)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        fp32 = export(a.run, "onnx", Path(td) / "model.onnx")
        int8 = quantize_int8(fp32, Path(td) / "model.int8.onnx",
                             train_images(a.run, a.data, n=a.calib_images))
        clfs = {name: Classifier.load(a.run, backend="onnx", onnx_path=p, screen=None)
                for name, p in (("onnx fp32", fp32), ("onnx int8", int8))}
        meta = clfs["onnx fp32"].meta
        ds = D.scan(a.data, classes=meta.classes)
        images, _ = D.load_images(ds, meta.image_size, progress=False)
        splits = D.apply_manifest(ds, D.read_manifest(Path(a.run) / "split.csv"))
        va = D.split_indices(splits, "val")
        x, y = np.asarray(images[va]), ds.labels[va]
        print(f"{a.run}: {len(y)} val images at {meta.image_size} px, batch {a.batch_size}")
        print(f"{'model':<10} {'MB':>5} {'val acc':>8} {'img/s':>7}")
        preds = {}
        for name, clf in clfs.items():
            logits = np.concatenate([clf.predict_logits_arrays(x[i:i + 256]) for i in range(0, len(x), 256)])
            preds[name] = logits.argmax(1)
            speed = images_per_s(clf, x[:a.speed_images], a.batch_size)
            size = Path(clf.onnx_path).stat().st_size / 1e6
            print(f"{name:<10} {size:5.1f} {(preds[name] == y).mean():8.4f} {speed:7.1f}", flush=True)
        agree = (preds["onnx fp32"] == preds["onnx int8"]).mean()
        print(f"int8 and fp32 agree on {agree:.4f} of val images")


if __name__ == "__main__":
    main()
