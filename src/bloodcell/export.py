"""Export a saved model to ONNX, for prediction through ONNX Runtime.

The exported graph takes what ``transforms.preprocess`` makes -- uint8 images,
``[N, S, S, 3]`` (NHWC) -- and returns raw logits ``[N, C]``: the cast, the
layout change and the normalisation live inside the file, so any ONNX runtime
gives the same answer with no Python preprocessing beyond decode+resize.
Temperature scaling stays outside (it is metadata and can be re-fitted
without re-exporting).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger("bloodcell")

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def weights_sha1(weights_path: str | os.PathLike) -> str:
    h = hashlib.sha1()
    with open(weights_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _uint8_wrapper(model):
    import torch

    class Uint8NHWC(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x.permute(0, 3, 1, 2).float())

    return Uint8NHWC(model).eval()


def export_onnx(model, meta: dict, out: str | os.PathLike, weights_sha: str = "",
                opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` (eval mode) as ONNX with a dynamic batch axis; checked with onnx.checker.
    Written atomically, so a concurrent reader never sees half a file."""
    import onnx
    import torch

    from .data import atomic_write_bytes
    if opset < 17:
        raise ValueError(f"opset {opset} too old: use >= 17")
    out = Path(out)
    size = int(meta["image_size"])
    model = model.eval()
    x = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.export")
    try:
        with warnings.catch_warnings():  # tracer chatter about python ints in SAME padding
            warnings.simplefilter("ignore")
            # TorchScript exporter: needs no onnxscript, handles every model in the registry
            torch.onnx.export(_uint8_wrapper(model), (x,), str(tmp), dynamo=False,
                              opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(str(tmp))
    finally:
        if tmp.exists():
            tmp.unlink()
    onnx.checker.check_model(proto)
    info = {"bloodcell_classes": json.dumps(list(meta["classes"])),
            "bloodcell_image_size": str(size),
            "bloodcell_architecture": str(meta.get("architecture", "")),
            "bloodcell_weights_sha1": weights_sha,
            "bloodcell_input": "uint8 [N, S, S, 3] RGB from transforms.preprocess; output raw logits"}
    for k, v in info.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    atomic_write_bytes(out, proto.SerializeToString())
    return out


def onnx_metadata(path: str | os.PathLike) -> dict:
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def default_onnx_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".onnx")


def ensure_onnx(weights_path: str | os.PathLike, model, meta: dict,
                onnx_path: str | os.PathLike | None = None) -> Path:
    """The ONNX file for a saved model: ``onnx_path`` if given (used as is), else a
    cached ``<stem>.onnx`` next to the weights, re-exported when missing or made
    from other weights. A read-only model folder (an installed package) falls
    back to the user cache."""
    if onnx_path is not None:
        p = Path(onnx_path)
        if not p.exists():
            raise FileNotFoundError(f"ONNX model not found: {p} (make one: bloodcell export --format onnx)")
        return p
    from .data import default_cache_dir
    sha = weights_sha1(weights_path)
    candidates = [default_onnx_path(Path(weights_path)),
                  default_cache_dir() / "onnx" / f"{sha[:20]}.onnx"]
    for c in candidates:
        if c.exists():
            try:
                if onnx_metadata(c).get("bloodcell_weights_sha1") == sha:
                    return c
            except Exception as e:  # unreadable cache: rebuild it
                log.warning("%s: unreadable ONNX cache (%s); re-exporting", c, e)
    from .predict import BUNDLED_DIR
    if Path(weights_path).resolve().parent == BUNDLED_DIR:
        candidates = candidates[1:]  # never write into the package (read-only once installed)
    for c in candidates:
        try:
            log.info("exporting %s to ONNX (%s), cached for later runs", weights_path, c)
            return export_onnx(model, meta, c, weights_sha=sha)
        except OSError as e:
            log.info("cannot write %s (%s); trying the next location", c, e)
    raise OSError(f"could not write an ONNX export for {weights_path} anywhere")


def export(model_path=None, fmt: str = "onnx", out=None, opset: int = ONNX_OPSET) -> Path:
    """``bloodcell export``: saved model (None = bundled) -> ONNX file (default next to it)."""
    from .models import load_model, resolve_model_path
    from .predict import bundled_model_path
    if fmt != "onnx":
        raise ValueError(f"unknown export format {fmt!r}: only onnx is supported")
    model_path = Path(model_path) if model_path else bundled_model_path()
    w, _ = resolve_model_path(model_path)
    model, meta = load_model(model_path)
    out = Path(out) if out else default_onnx_path(w)
    return export_onnx(model, meta, out, weights_sha=weights_sha1(w), opset=opset)


def cmd_export(args):
    import numpy as np

    out = export(args.model, args.format, args.out, args.opset)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}, dynamic batch, "
          "input uint8 [N,S,S,3], output logits)")
    if not args.no_verify:
        # the same images through both runtimes: the export must not change answers
        from .predict import Classifier
        t = Classifier.load(args.model, backend="torch", screen=None)
        o = Classifier.load(args.model, backend="onnx", onnx_path=out, screen=None)
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (8, t.image_size, t.image_size, 3), dtype=np.uint8)
        pt, po = t.predict_proba_arrays(x), o.predict_proba_arrays(x)
        diff = float(np.abs(pt - po).max())
        same = bool((pt.argmax(1) == po.argmax(1)).all())
        print(f"check vs PyTorch on 8 random images: same classes {same}, max |dp| {diff:.2e}")
        if not same or diff > 1e-3:
            raise ValueError(f"{out}: ONNX output differs from PyTorch (max |dp| {diff:.2e})")


def add_cli(sub):
    p = sub.add_parser("export", help="export a saved model (default: the bundled one) to ONNX")
    p.add_argument("--model", help="run folder or model file (default: the bundled model)")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", help="output file (default: <model>.onnx next to the weights)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET)
    p.add_argument("--no-verify", action="store_true", help="skip the PyTorch-vs-ONNX check")
    p.set_defaults(func=cmd_export)
