"""``bloodcell export``: a saved model to ONNX (float32 or static int8)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..export import INT8_CALIB_IMAGES, INT8_WEIGHT_BITS, ONNX_OPSET, export, quantize_int8, train_images
from ..modelfile import bundled_model_path, resolve_model_path
from ..predict import Classifier
from .args import check_out, data_or_default

log = logging.getLogger("bloodcell")


def cmd_export(args):
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: is a folder; give a file name such as model.onnx")
    if args.out:
        check_out(args.out, folder=False)

    if args.format == "onnx-int8":
        w, _ = resolve_model_path(args.model or bundled_model_path())
        fp32 = export(args.model, "onnx", Path(args.out or w.with_suffix(".onnx")).with_suffix(".fp32.onnx"),
                      args.opset)
        calib = train_images(args.model or bundled_model_path(), data_or_default(args.data), n=args.calib_images)
        out = quantize_int8(fp32, args.out or w.with_suffix(".int8.onnx"), calib,
                            weight_bits=args.int8_weight_bits)
        fp32.unlink()
    else:
        out = export(args.model, args.format, args.out, args.opset)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}, dynamic batch, "
          "input uint8 [N,S,S,3], output logits)")
    if not args.no_verify:
        # the same images through both runtimes: the export must not change answers
        t = Classifier.load(args.model, backend="torch", screen=None, fallback=None)
        o = Classifier.load(args.model, backend="onnx", onnx_path=out, screen=None, fallback=None)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (8, t.image_size, t.image_size, 3), dtype=np.uint8)
        pt, po = t.predict_proba_arrays(x), o.predict_proba_arrays(x)
        diff = float(np.abs(pt - po).max())
        same = bool((pt.argmax(1) == po.argmax(1)).all())
        print(f"check vs PyTorch on 8 random images: same classes {same}, max |dp| {diff:.2e}")
        if args.format == "onnx-int8":  # quantised: the same classes is the bar, not equal numbers
            if not same:
                log.warning("int8 model changes some classes on random images: check it on the "
                            "test split (bloodcell evaluate --backend onnx-int8)")
        elif not same or diff > 1e-3:
            raise ValueError(f"{out}: ONNX output differs from PyTorch (max |dp| {diff:.2e})")


def add_commands(sub):
    p = sub.add_parser("export", help="export a saved model (default: the bundled one) to ONNX")
    p.add_argument("--model", help="run folder or model file (default: the bundled model)")
    p.add_argument("--format", default="onnx", choices=["onnx", "onnx-int8"],
                   help="onnx (float32, same numbers as PyTorch) or onnx-int8 (static int8, "
                        "calibrated on training images of --data; faster, check its accuracy)")
    p.add_argument("--data", help="dataset folder for int8 calibration (default ../shared/data/pbc)")
    p.add_argument("--calib-images", type=int, default=INT8_CALIB_IMAGES,
                   help=f"training images for int8 calibration (default {INT8_CALIB_IMAGES})")
    p.add_argument("--int8-weight-bits", type=int, choices=(7, 8), default=INT8_WEIGHT_BITS,
                   help="8 (default: needs a CPU with VNNI or AMX to be used by default; "
                        "`--backend auto` falls back to float elsewhere) or 7 (safe on any x86 CPU, "
                        "less accurate)")
    p.add_argument("--out", help="output file (default: <model>.onnx next to the weights)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET)
    p.add_argument("--no-verify", action="store_true", help="skip the PyTorch-vs-ONNX check")
    p.set_defaults(func=cmd_export)
