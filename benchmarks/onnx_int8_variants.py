"""Static int8 variants of the bundled model against its float32 ONNX export, on the
held-out test split of its seed-42 split (2,393 PBC images): errors, agreement with
fp32 and model-only CPU ms per image (one thread, batch 64). Int8 becomes the default
only if it stays within 0.1 point of fp32 (<= 2 more wrong images of 2,393).

    python benchmarks/onnx_int8_variants.py [--data ../shared/data/pbc] [VARIANT ...]

Variants keep some layers in float (the stem convolution, the classifier head), use
more calibration images (training split only), another calibration method, or full 8-bit
weights ("8bit": no reduce_range; 7 bits are for AVX2 CPUs without VNNI, where
8-bit products can saturate; AVX512-VNNI and AMX CPUs do not need it). The
bundled ``model.int8.onnx`` (since row 26 of docs/experiments.md: 8-bit weights, stem and
head in float, 1,000 images) is measured beside them.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bloodcell import data as D
from bloodcell.export import ensure_onnx, onnx_metadata, quantize_int8, train_images
from bloodcell.modelfile import ModelFile, bundled_model_path, resolve_model_path
from bloodcell.predict import Classifier

# name -> (calibration images, float nodes: "stem", "head", "stem3" = the first 3 convs, method,
#          7-bit weights (reduce_range))
VARIANTS = {
    "float-stem-head-300": (300, ("stem", "head"), "MinMax", True),
    "float-stem-head-1000": (1000, ("stem", "head"), "MinMax", True),
    "float-stem-head-1000-percentile": (1000, ("stem", "head"), "Percentile", True),
    "float-stem-head-1000-entropy": (1000, ("stem", "head"), "Entropy", True),
    "float-stem3-head-1000": (1000, ("stem3", "head"), "MinMax", True),
    "8bit-300": (300, (), "MinMax", False),
    "8bit-1000": (1000, (), "MinMax", False),
    "8bit-float-stem-head-1000": (1000, ("stem", "head"), "MinMax", False),
    # depthwise convolutions in float too: are ONNX Runtime's int8 depthwise kernels the slow part?
    "8bit-float-stem-head-dw-1000": (1000, ("stem", "head", "depthwise"), "MinMax", False),
}


def quantize(fp32: Path, out: Path, calib: np.ndarray, keep_float: tuple, method: str,
             seven_bit: bool = True) -> Path:
    """export.quantize_int8 (QDQ, per-channel weights), with the variant's settings."""
    return quantize_int8(fp32, out, calib, weight_bits=7 if seven_bit else 8, keep_float=keep_float,
                         method=method)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", help=f"some of: {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--data", default=str(D.default_data_dir() or "../shared/data/pbc"))
    a = ap.parse_args()
    unknown = sorted(set(a.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    model = bundled_model_path()
    weights, meta_file = resolve_model_path(model)
    meta = ModelFile.load(meta_file)
    fp32 = ensure_onnx(weights, None, meta)
    ds = D.scan(a.data, classes=meta.classes)
    images, _ = D.load_images(ds, meta.image_size, progress=False)
    test = D.split_indices(D.model_splits(ds, meta.train_args, model), "test")
    x, y = np.asarray(images[test]), ds.labels[test]

    def classes(onnx_file):
        clf = Classifier.load(model, backend="onnx", onnx_path=onnx_file, screen=None, threads=1)
        t = time.process_time()
        logits = np.concatenate([clf.predict_logits_arrays(x[i:i + 64]) for i in range(0, len(x), 64)])
        return logits.argmax(1), 1000 * (time.process_time() - t) / len(x)

    ref, ms = classes(fp32)
    print(f"{len(y)} test images (seed-42 split of {a.data}); one thread, batch 64\n")
    print("| model | test accuracy | wrong | agrees with fp32 | CPU ms/image |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fp32 | {100 * np.mean(ref == y):.2f} % | {np.sum(ref != y)} | - | {ms:.2f} |")

    def row(name, pred, ms):
        print(f"| {name} | {100 * np.mean(pred == y):.2f} % | {np.sum(pred != y)} "
              f"| {100 * np.mean(pred == ref):.2f} % | {ms:.2f} |", flush=True)

    bundled = weights.with_suffix(".int8.onnx")
    m = onnx_metadata(bundled)
    row(f"int8 bundled ({m.get('bloodcell_int8_weight_bits', '7')}-bit weights, float: "
        f"{m.get('bloodcell_int8_float_nodes') or 'none'}, "
        f"{m.get('bloodcell_int8_calibration_images', '300')} images)", *classes(bundled))
    calib = {}
    with tempfile.TemporaryDirectory() as td:
        for name in a.variants or VARIANTS:
            n, keep, method, seven_bit = VARIANTS[name]
            if n not in calib:
                calib[n] = train_images(model, a.data, n=n)
            row(name, *classes(quantize(fp32, Path(td) / f"{name}.onnx", calib[n], keep, method, seven_bit)))


if __name__ == "__main__":
    main()
