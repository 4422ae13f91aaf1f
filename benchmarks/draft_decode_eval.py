"""What a cheaper decode would cost the bundled model: JPEG decoded at half scale (PIL draft
mode to >= 1x the model's size instead of bloodcell's >= 2x), centre square, resize,
against `transforms.preprocess`, both through the bundled float model, on the validation
and test splits of its seed-42 split. Prints accuracy, errors, agreement and the decode's
CPU time per image (one thread).

    python benchmarks/draft_decode_eval.py [--data ../shared/data/pbc]
"""
import argparse
import time

import numpy as np
from PIL import Image

from bloodcell import data as D
from bloodcell.modelfile import ModelFile, bundled_model_path, resolve_model_path
from bloodcell.predict import Classifier
from bloodcell.transforms import preprocess


def draft_preprocess(path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(D.default_data_dir() or "../shared/data/pbc"))
    a = ap.parse_args()
    model = bundled_model_path()
    meta = ModelFile.load(resolve_model_path(model)[1])
    ds = D.scan(a.data, classes=meta.classes)
    splits = D.model_splits(ds, meta.train_args, model)
    clf = Classifier.load(model, backend="onnx", screen=None)
    paths = ds.paths()
    print("| split | images | preprocess: accuracy (wrong) | draft: accuracy (wrong) | same class "
          "| decode CPU ms/image: preprocess / draft |")
    print("|---|---:|---:|---:|---:|---:|")
    for split in ("val", "test"):
        idx = D.split_indices(splits, split)
        y = ds.labels[idx]
        arrays = {}
        cpu = {}
        for name, fn in (("preprocess", preprocess), ("draft", draft_preprocess)):
            t = time.thread_time()
            arrays[name] = np.stack([fn(paths[i], clf.image_size) for i in idx])
            cpu[name] = 1000 * (time.thread_time() - t) / len(idx)
        pred = {k: clf.predict_proba_arrays(v).argmax(1) for k, v in arrays.items()}
        cells = [f"{100 * np.mean(pred[k] == y):.2f} % ({np.sum(pred[k] != y)})" for k in ("preprocess", "draft")]
        same = 100 * np.mean(pred["preprocess"] == pred["draft"])
        print(f"| {split} | {len(y)} | {cells[0]} | {cells[1]} | {same:.2f} % "
              f"| {cpu['preprocess']:.2f} / {cpu['draft']:.2f} |")


if __name__ == "__main__":
    main()
