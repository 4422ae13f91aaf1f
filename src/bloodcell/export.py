"""Export a saved model to ONNX, for prediction through ONNX Runtime.

The exported graph takes what ``transforms.preprocess`` makes -- uint8 images,
``[N, S, S, 3]`` (NHWC) -- and returns raw logits ``[N, C]``: the cast, the
layout change and the normalisation live inside the file, so any ONNX runtime
gives the same answer with no Python preprocessing beyond decode+resize.
Temperature scaling stays outside (it is metadata and can be re-fitted
without re-exporting).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from .modelfile import BUNDLED_DIR, ModelFile, resolve_model_path, weights_sha1

log = logging.getLogger("bloodcell")

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# bump when the exported graph changes: cached exports of older versions are redone
EXPORT_VERSION = "3"


def _static_padding(model, size: int):
    """A copy of ``model`` whose TF-'SAME' convolutions pad by constants worked out for
    ``size`` x ``size`` inputs. Traced as is, the padding becomes ~10 shape ops per
    convolution plus a Pad that ONNX Runtime cannot fuse (each costing two layout
    reorders); with constant pads it folds them into the Conv itself."""
    import copy

    import torch
    import torch.nn.functional as F

    from .models import _same_pad, _SameConv
    model = copy.deepcopy(model).eval()
    convs = [m for m in model.modules() if isinstance(m, _SameConv)]
    if not convs:
        return model
    shapes = {}

    def record(m, args):  # returns None: the input passes unchanged
        shapes[m] = tuple(args[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in convs]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()

    class FixedPadConv(torch.nn.Module):
        def __init__(self, conv, hw):
            super().__init__()
            self.conv = conv
            k, st = conv.kernel_size[0], conv.stride[0]
            probe = _same_pad(torch.zeros(1, 1, *hw), k, st)  # the same rule, evaluated once
            ph, pw = probe.shape[-2] - hw[0], probe.shape[-1] - hw[1]
            self.pads = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]

        def forward(self, x):
            c = self.conv
            return F.conv2d(F.pad(x, self.pads), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _SameConv):
                setattr(parent, name, FixedPadConv(child, shapes[child]))
    return model


def _constant_folded(path: Path):
    """The exported graph after ONNX Runtime's basic (hardware-independent) optimisations:
    constant folding turns the tracer's pad-list arithmetic into plain constants."""
    import onnx
    import onnxruntime as ort
    out = path.with_name(path.name + ".basic")
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))
    finally:
        if out.exists():
            out.unlink()


def _fold_pads_into_convs(proto) -> int:
    """Zero ``Pad`` -> ``Conv`` becomes one Conv with (possibly asymmetric) ``pads``, which
    ONNX allows and ONNX Runtime runs without a separate pad and two layout reorders."""
    from onnx import helper, numpy_helper
    g = proto.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    folded = []
    for pad in g.node:
        if pad.op_type != "Pad" or pad.output[0] in graph_outputs:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = consts.get(pad.input[1]) if len(pad.input) > 1 else None
        value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        conv = users.get(pad.output[0], [])
        if (mode != b"constant" or pads is None or value is None or float(value) != 0.0
                or len(pads) != 8 or any(pads[[0, 1, 4, 5]]) or len(conv) != 1
                or conv[0].op_type != "Conv"):
            continue
        conv = conv[0]
        old = next((a for a in conv.attribute if a.name == "pads"), None)
        if old is not None and any(old.ints):
            continue
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        if old is not None:
            conv.attribute.remove(old)
        h0, w0, h1, w1 = (int(v) for v in pads[[2, 3, 6, 7]])
        conv.attribute.append(helper.make_attribute("pads", [h0, w0, h1, w1]))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        g.node.remove(pad)
    # the pad amounts are constants nobody reads any more: drop them (ORT warns about each)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(n)
    return len(folded)


def _uint8_wrapper(model):
    import torch

    class Uint8NHWC(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x.permute(0, 3, 1, 2).float())

    return Uint8NHWC(model).eval()


def export_onnx(model, meta: ModelFile, out: str | os.PathLike, weights_sha: str = "",
                opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` (eval mode) as ONNX with a dynamic batch axis; checked with onnx.checker.
    Written atomically, so a concurrent reader never sees half a file."""
    import onnx
    import torch

    from .data import atomic_write_bytes
    if opset < 17:
        raise ValueError(f"opset {opset} too old: use >= 17")
    out = Path(out)
    size = meta.image_size
    model = model.eval()
    x = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.export")
    try:
        with warnings.catch_warnings():  # tracer chatter about python ints in SAME padding
            warnings.simplefilter("ignore")
            # TorchScript exporter: needs no onnxscript, handles every model in the registry
            torch.onnx.export(_uint8_wrapper(_static_padding(model, size)), (x,), str(tmp), dynamo=False,
                              opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = _constant_folded(tmp)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fold_pads_into_convs(proto)
    onnx.checker.check_model(proto)
    info = {"bloodcell_classes": json.dumps(list(meta.classes)),
            "bloodcell_image_size": str(size),
            "bloodcell_architecture": meta.architecture,
            "bloodcell_weights_sha1": weights_sha,
            "bloodcell_export_version": EXPORT_VERSION,
            "bloodcell_input": "uint8 [N, S, S, 3] RGB from transforms.preprocess; output raw logits"}
    for k, v in info.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    atomic_write_bytes(out, proto.SerializeToString())
    return out


def onnx_metadata(path: str | os.PathLike) -> dict:
    """The file's metadata_props (bloodcell_weights_sha1, ...). ``ensure_onnx`` and
    ``find_int8`` take another reader: prediction reads them from its ONNX Runtime
    session instead, so its start-up neither imports onnx nor parses the file twice."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def default_onnx_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".onnx")


def ensure_onnx(weights_path: str | os.PathLike, model, meta: ModelFile,
                onnx_path: str | os.PathLike | None = None, metadata=onnx_metadata) -> Path:
    """The ONNX file for a saved model: ``onnx_path`` if given (used as is), else a
    cached ``<stem>.onnx`` next to the weights, re-exported when missing or made
    from other weights (``model`` None: loaded from the weights only then). A
    read-only model folder (an installed package) falls back to the user cache.
    ``metadata``: path -> the file's metadata (see ``onnx_metadata``)."""
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
                md = metadata(c)
                if (md.get("bloodcell_weights_sha1") == sha
                        and md.get("bloodcell_export_version") == EXPORT_VERSION):
                    return c
            except Exception as e:  # unreadable cache: rebuild it
                log.warning("%s: unreadable ONNX cache (%s); re-exporting", c, e)
    if BUNDLED_DIR in Path(weights_path).resolve().parents:  # the bundled model or its other-labs model
        candidates = candidates[1:]  # never write into the package (read-only once installed)
    if model is None:
        from .models import load_model
        model = load_model(weights_path)[0]
    for c in candidates:
        try:
            log.info("exporting %s to ONNX (%s), cached for later runs", weights_path, c)
            return export_onnx(model, meta, c, weights_sha=sha)
        except OSError as e:
            log.info("cannot write %s (%s); trying the next location", c, e)
    raise OSError(f"could not write an ONNX export for {weights_path} anywhere")


def default_int8_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".int8.onnx")


def find_int8(weights_path: str | os.PathLike, metadata=onnx_metadata) -> Path:
    """The int8 ONNX file made for these weights (``bloodcell export --format onnx-int8``).
    Unlike the float export it cannot be made on the fly: it needs calibration images."""
    p = default_int8_path(Path(weights_path))
    hint = f"make it with `bloodcell export --format onnx-int8 --model {weights_path} --data DATA`"
    if not p.exists():
        raise FileNotFoundError(f"no int8 model next to {weights_path} ({p}); {hint}")
    if metadata(p).get("bloodcell_weights_sha1") != weights_sha1(weights_path):
        raise ValueError(f"{p} was made from other weights than {weights_path}; {hint}")
    return p


# The int8 recipe (docs/experiments.md rows 24-25, benchmarks/onnx_int8_variants.py): on the
# seed-42 test split the bundled model keeps fp32's 98.50 % with 8-bit weights, the stem
# convolution and the classifier head in float, calibrated on 1,000 train images; 7-bit
# weights on every layer (the old recipe) lost 0.13 point.
INT8_WEIGHT_BITS = 8
INT8_FLOAT_NODES = ("stem", "head")
INT8_CALIB_IMAGES = 1000


def _float_node_names(fp32_onnx, keep_float: tuple[str, ...]) -> list[str]:
    """Graph nodes left in float: "stem" = the first convolution, "stem3" = the first three,
    "head" = the classifier, "depthwise" = every grouped convolution."""
    import onnx
    g = onnx.load(str(fp32_onnx)).graph
    convs = [n for n in g.node if n.op_type == "Conv"]
    picks = {"stem": convs[:1], "stem3": convs[:3],
             "head": [n for n in g.node if n.op_type in ("Gemm", "MatMul")],
             "depthwise": [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]}
    unknown = set(keep_float) - set(picks)
    if unknown:
        raise ValueError(f"unknown float node group(s) {sorted(unknown)}: use {', '.join(picks)}")
    return list(dict.fromkeys(n.name for k in keep_float for n in picks[k]))


def quantize_int8(fp32_onnx: str | os.PathLike, out: str | os.PathLike, calib,
                  batch: int = 32, weight_bits: int = INT8_WEIGHT_BITS,
                  keep_float: tuple[str, ...] = INT8_FLOAT_NODES, method: str = "MinMax") -> Path:
    """Static int8 quantisation (QDQ, per-channel weights) calibrated on ``calib``, uint8
    images as the model takes them. ``weight_bits`` 8, or 7 (reduce_range) for CPUs whose
    int8 products can saturate with full-range weights (x86 without VNNI/AMX: see
    ``predict.int8_exact_here``); the file records which in ``bloodcell_int8_weight_bits``.
    ``method``: the activation ranges' calibration (MinMax, Percentile, Entropy)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from .data import atomic_write_bytes
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, not {weight_bits}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{INPUT_NAME: calib[i:i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self.it, None)

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.quant")
    root = logging.getLogger()  # the quantiser logs a line per rescaled bias to the root logger
    level = root.level
    try:
        root.setLevel(logging.ERROR)
        quantize_static(str(fp32_onnx), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=weight_bits == 7, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=_float_node_names(fp32_onnx, tuple(keep_float)),
                        calibrate_method=getattr(CalibrationMethod, method))
        import onnx
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]  # keep the float export's provenance (weights sha1, classes...)
        info = {**onnx_metadata(fp32_onnx), "bloodcell_int8_weight_bits": str(weight_bits),
                "bloodcell_int8_float_nodes": ",".join(keep_float),
                "bloodcell_int8_calibration_images": str(len(calib))}
        for k, v in info.items():
            p = proto.metadata_props.add()
            p.key, p.value = k, v
        atomic_write_bytes(out, proto.SerializeToString())
    finally:
        root.setLevel(level)
        if tmp.exists():
            tmp.unlink()
    return out


def train_images(model_path, data, n: int = 300, seed: int = 0, cache_dir=None):
    """``n`` training-split images of the model's run (never val/test), for calibration."""
    import numpy as np

    from . import data as D
    from .locate import Framing
    meta = ModelFile.load(model_path)
    ds = D.scan(data, classes=meta.classes)
    images, _ = D.load_images(ds, meta.image_size, cache_dir, progress=False,
                              framing=Framing.of_model(meta))
    splits = D.model_splits(ds, meta.train_args, model_path)
    idx = D.split_indices(splits, "train")
    idx = np.sort(np.random.default_rng(seed).choice(idx, min(n, len(idx)), replace=False))
    return np.asarray(images[idx])


def export(model_path=None, fmt: str = "onnx", out=None, opset: int = ONNX_OPSET) -> Path:
    """``bloodcell export``: saved model (None = bundled) -> ONNX file (default next to it)."""
    from .modelfile import bundled_model_path
    from .models import load_model
    if fmt not in ("onnx", "onnx-int8"):
        raise ValueError(f"unknown export format {fmt!r}: use onnx or onnx-int8")
    model_path = Path(model_path) if model_path else bundled_model_path()
    w, _ = resolve_model_path(model_path)
    model, meta = load_model(model_path)
    out = Path(out) if out else default_onnx_path(w)
    return export_onnx(model, meta, out, weights_sha=weights_sha1(w), opset=opset)
