"""The model runtime: PyTorch and ONNX Runtime behind one ``.logits(batch)``, and the
one batched loop that prediction, evaluation, calibration, the study and training's
validation all run images through.

A batch is what ``transforms.preprocess`` makes: uint8 [N, S, S, 3], RGB 0-255. Both
runners refuse anything else with a message saying what came in: a float image in
0..1 cast to uint8 would silently become 0s and 1s, and a wrong size would reach the
model unchecked.

torch is imported only inside ``TorchRunner`` and ``autocast``: the ONNX path of
``bloodcell predict`` runs without loading PyTorch at all.
"""
from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np

from .export import INPUT_NAME

# onnx-int8: a quantised file made by `bloodcell export`; auto: that file where it is made for
# these weights with 8-bit weights and this CPU multiplies them exactly (cpu.has_int8_dot), else onnx
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


class Runner(Protocol):
    image_size: int

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> raw logits [N, C] (float32)."""


def check_batch(batch, image_size: int) -> np.ndarray:
    """The batch as a contiguous uint8 [N, S, S, 3] array, or a ValueError naming the
    expected and the actual dtype or shape."""
    a = np.asarray(batch)
    want = f"uint8 images [N, {image_size}, {image_size}, 3] (RGB 0-255, as transforms.preprocess makes)"
    if a.dtype != np.uint8:
        hint = (": scale floats to 0-255 first, or pass the images through transforms.preprocess"
                if a.dtype.kind == "f" else "")
        raise ValueError(f"model input must be {want}, got dtype {a.dtype}{hint}")
    if a.ndim != 4 or a.shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"model input must be {want}, got shape {list(a.shape)}")
    return np.ascontiguousarray(a)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def autocast(device, precision: str):
    """bf16 autocast when ``precision == "bf16"`` (training on a GPU), else a no-op."""
    import torch
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class TorchRunner:
    """A PyTorch model in eval mode on ``device`` (default: where its weights are), with
    bf16 autocast when ``precision`` asks for it."""

    def __init__(self, model, image_size: int, device=None, precision: str = "fp32"):
        self.image_size = int(image_size)
        self.device = device or next(model.parameters()).device
        self.precision = precision
        # eval mode (training's validation hands over a model fresh from train mode); the
        # caller picks the memory format (channels_last: faster on CPU)
        self.model = model.eval()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from .tensorops import to_tensor
        x = to_tensor(check_batch(batch, self.image_size)).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model(x).float().cpu().numpy()


def ort_session(path, threads: int | None = None):
    """An ONNX Runtime session on the CPU, set up for predict's decode-ahead threads."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    # no pre-planned block for the whole graph: peak memory of `bloodcell predict` over
    # 600 files 537 -> 392 MB, no slower (ORT's arena still reuses the buffers)
    so.enable_mem_pattern = False
    so.log_severity_level = 3  # errors only: graph-optimiser notes are not the user's business
    # no busy-waiting between ops: the decode threads need those cycles
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """An exported model (uint8 NHWC in, logits out: ``export.export_onnx``) in ONNX
    Runtime on the CPU. ``session``: one already opened on ``path`` (the Classifier reads
    the file's metadata through it, so the file is parsed once)."""

    def __init__(self, path: str | os.PathLike, image_size: int, threads: int | None = None,
                 session=None):
        self.path = path
        self.image_size = int(image_size)
        if session is None:
            try:
                session = ort_session(path, threads)
            except Exception as e:  # onnxruntime's own error types for a damaged or foreign file
                first = str(e).strip().splitlines()[0] if str(e).strip() else e
                raise ValueError(f"{path}: not a usable ONNX model ({type(e).__name__}: {first})") from None
        self.session = session
        shape = session.get_inputs()[0].shape  # [batch, S, S, 3]; a file of another model fails here, not mid-job
        if len(shape) != 4 or any(isinstance(d, int) and d != want
                                  for d, want in zip(shape[1:], (self.image_size, self.image_size, 3))):
            raise ValueError(f"{path}: takes input {shape}, not this model's [N, {self.image_size}, "
                             f"{self.image_size}, 3] (an ONNX file of another model?)")

    def logits(self, batch: np.ndarray) -> np.ndarray:
        x = check_batch(batch, self.image_size)
        return self.session.run(None, {INPUT_NAME: x})[0].astype(np.float32)


def batched_logits(runner: Runner, images, idx: Sequence[int] | np.ndarray | None = None,
                   batch_size: int = 128, progress: bool = False, desc: str = "predicting") -> np.ndarray:
    """Logits for ``images[idx]`` (all images when idx is None), ``batch_size`` at a
    time: the images may be a memory-mapped cache far bigger than memory."""
    from tqdm import tqdm
    n = len(images) if idx is None else len(idx)
    out = []
    for i in tqdm(range(0, n, batch_size), disable=not progress, desc=desc, unit="batch",
                  mininterval=1.0):
        sel = slice(i, i + batch_size) if idx is None else np.asarray(idx[i:i + batch_size])
        out.append(runner.logits(np.asarray(images[sel])))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
