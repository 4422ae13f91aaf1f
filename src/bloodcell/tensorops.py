"""The torch side of preprocessing: uint8 NHWC arrays -> float tensors, the in-model
normalisation and the Keras-style augmentation layer. Apart from ``transforms`` so that
decoding (and ONNX Runtime inference) runs without importing torch."""
from __future__ import annotations

import math

import numpy as np
import torch


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in 0..255, channels_last memory."""
    a = np.ascontiguousarray(batch)
    if not a.flags.writeable:  # a read-only memory map: torch wants writable memory
        a = a.copy()
    t = torch.from_numpy(a).permute(0, 3, 1, 2).float()
    return t.contiguous(memory_format=torch.channels_last)


class Normalize(torch.nn.Module):
    """0..255 input -> (x/255 - mean) / std, inside the model so exports carry it."""

    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, x):
        return (x - self.mean) / self.std


class Augment(torch.nn.Module):
    """Random flips + rotation (+ optional scale and stain/colour jitter), a
    Keras-style preprocessing layer: active in train mode, identity in eval.

    ``rotation`` is a fraction of a full turn, as Keras ``RandomRotation(0.4)``
    (+-144 degrees); borders are filled by reflection like Keras' default.
    All ops run on the whole batch at once (one ``grid_sample``), which is far
    cheaper on 2 cores than per-image PIL augmentation in worker processes.
    """

    def __init__(self, flip: bool = True, rotation: float = 0.4, scale: float = 0.0,
                 color: float = 0.0):
        super().__init__()
        self.flip, self.rotation, self.scale, self.color = flip, rotation, scale, color

    def extra_repr(self):
        return f"flip={self.flip}, rotation={self.rotation}, scale={self.scale}, color={self.color}"

    def forward(self, x):
        if not self.training:
            return x
        n = x.shape[0]
        dev = x.device
        theta = torch.zeros(n, 2, 3, device=dev)
        ang = (torch.rand(n, device=dev) * 2 - 1) * self.rotation * 2 * math.pi
        zoom = 1.0 + (torch.rand(n, device=dev) * 2 - 1) * self.scale
        sx = zoom.clone()
        sy = zoom.clone()
        if self.flip:
            sx = sx * torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
            sy = sy * torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
        theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
        if self.rotation or self.scale or self.flip:
            grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
            x = torch.nn.functional.grid_sample(x, grid.to(x.dtype), mode="bilinear",
                                                padding_mode="reflection", align_corners=False)
        if self.color:
            c = self.color
            shape = (n, 1, 1, 1)
            bright = 1 + (torch.rand(shape, device=dev) * 2 - 1) * c
            contrast = 1 + (torch.rand(shape, device=dev) * 2 - 1) * c
            sat = 1 + (torch.rand(shape, device=dev) * 2 - 1) * c
            # per-channel gain: mimics stain-intensity and white-balance drift between labs
            gain = 1 + (torch.rand(n, 3, 1, 1, device=dev) * 2 - 1) * c / 2
            x = x * bright * gain
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast + mean
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - gray) * sat + gray
            x = x.clamp(0, 255)
        return x.contiguous(memory_format=torch.channels_last)
