"""Copy a trained, calibrated, evaluated run into the package as the bundled model.

    .venv/bin/python scripts/bundle_model.py runs/recipe-s42
    .venv/bin/python scripts/bundle_model.py --other-labs runs/robust3-s43

``--other-labs``: bundle it as the other-labs model instead (``bundled/other-labs/``),
the one `bloodcell predict` and the lab page use for images whose colours the bundled
model's input check calls unlike its training images.

Needs RUN/model.{safetensors,json} (after `bloodcell calibrate`), RUN/eval-test/
(`bloodcell evaluate --split test --out RUN/eval-test`) and RUN/calibration.json.
The test metrics and calibration report go into the bundled model.json, which
`bloodcell serve` shows as the model card. RUN/model.int8.onnx, if made for these
weights (`bloodcell export --format onnx-int8 --model RUN`), is bundled too, so
`--backend onnx-int8` works out of the box.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

from bloodcell.export import find_int8
from bloodcell.modelfile import BUNDLED_DIR, ModelFile
from bloodcell.predict import FALLBACK_DIR

MAX_BYTES = 25_000_000


def main(run: Path, dest: Path = BUNDLED_DIR):
    meta = ModelFile.load(run / "model.json")
    if dest != BUNDLED_DIR:  # the other-labs model: it must fit the bundled model it serves
        main_meta = ModelFile.load(BUNDLED_DIR / "model.json")
        if list(meta.classes) != list(main_meta.classes):
            sys.exit(f"{run}: classes {meta.classes} are not the bundled model's {main_meta.classes}")
        if main_meta.input_check is None:
            sys.exit("the bundled model has no colour statistics to route images with (bloodcell calibrate)")
    ev = json.loads((run / "eval-test" / "evaluation.json").read_text())
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    calib = json.loads((run / "calibration.json").read_text())
    weights = run / "model.safetensors"
    if weights.stat().st_size > MAX_BYTES:
        sys.exit(f"{weights} is over 25 MB: save it as fp16 first")
    meta.metrics = {"split": "test", "accuracy": metrics["accuracy"],
                    "accuracy_ci95": ev["accuracy_ci95"], "macro_f1": metrics["macro_f1"],
                    "n_images": metrics["n_images"], "per_class": metrics["per_class"],
                    "confusion_matrix": metrics["confusion_matrix"]}
    meta.calibration = calib
    meta.data["root"] = Path(meta.data["root"]).name  # no local paths in the package
    meta.train_args["data"] = Path(meta.train_args["data"]).name
    dest.mkdir(exist_ok=True)
    shutil.copyfile(weights, dest / "model.safetensors")
    meta.save(dest / "model.json")
    stale = dest / "model.int8.onnx"
    stale.unlink(missing_ok=True)
    try:
        shutil.copyfile(find_int8(weights), stale)
        print(f"bundled the int8 ONNX file ({stale.stat().st_size / 1e6:.1f} MB)")
    except (FileNotFoundError, ValueError) as e:
        print(f"no int8 file bundled: {e}")
    print(f"bundled {run} -> {dest} (test accuracy {metrics['accuracy']:.4f})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--other-labs", action="store_true", help="bundle it as the other-labs model")
    a = ap.parse_args()
    main(a.run, BUNDLED_DIR / FALLBACK_DIR if a.other_labs else BUNDLED_DIR)
