"""Domain augmentation: what changes between labs, simulated on PBC images so the
model learns to ignore it (issue: other labs' cells).

Each op is a batch-level torch op (cheap on 2 cores), active in train mode only,
applied with its own probability per image:
- geometry: flips, any rotation, a wide zoom range (other magnifications and
  locator errors) and a small shift; uncovered corners get each image's own
  background colour, as the framing pads (so padding is no class cue);
- stain: optical-density jitter per channel (stain strength and hue: Giemsa vs
  rapid stains), plus brightness/contrast/saturation/white balance and gamma;
- optics: Gaussian blur (focus), resolution loss down to ~1/3 of the input
  side (low-resolution cameras, small crops), JPEG recompression, sensor noise.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F


class DomainAugment(torch.nn.Module):
    def __init__(self, zoom: float = 0.35, shift: float = 0.06, stain: float = 0.25,
                 color: float = 0.2, p_blur: float = 0.3, p_lowres: float = 0.3,
                 min_res: float = 0.33, p_jpeg: float = 0.15, noise: float = 3.0, p: float = 1.0):
        super().__init__()
        self.p = p  # share of images that get the stain, colour and optics ops (all get geometry)
        self.zoom, self.shift, self.stain, self.color = zoom, shift, stain, color
        self.p_blur, self.p_lowres, self.min_res = p_blur, p_lowres, min_res
        self.p_jpeg, self.noise = p_jpeg, noise

    def extra_repr(self):
        return (f"zoom={self.zoom}, shift={self.shift}, stain={self.stain}, color={self.color}, "
                f"p_blur={self.p_blur}, p_lowres={self.p_lowres}, p_jpeg={self.p_jpeg}, p={self.p}")

    def forward(self, x):
        if not self.training:
            return x
        with torch.autocast(x.device.type, enabled=False):  # colour maths in float32
            return self._augment(x.float())

    def _augment(self, x):
        x = self.geometry(x)
        if self.p >= 1:
            return self._appearance(x)
        # the rest keep the source lab's look (in-domain accuracy needs them); only the
        # picked images go through the appearance ops (the JPEG one is a Python loop)
        pick = torch.rand(x.shape[0], device=x.device) < self.p
        if pick.any():
            x = x.clone()
            x[pick] = self._appearance(x[pick])
        return x.clamp(0, 255).contiguous(memory_format=torch.channels_last)

    def _appearance(self, x):
        x = self.stain_jitter(x)
        x = self.colour_jitter(x)
        x = self.blur(x)
        x = self.low_resolution(x)
        x = self.jpeg(x)
        if self.noise:
            x = x + torch.randn_like(x) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device) * self.noise)
        return x.clamp(0, 255).contiguous(memory_format=torch.channels_last)

    # -- geometry
    def geometry(self, x):
        n = x.shape[0]
        ang = torch.rand(n, device=x.device) * 2 * math.pi
        # log-uniform zoom: >1 samples a larger area (the cell looks smaller)
        zoom = torch.exp((torch.rand(n, device=x.device) * 2 - 1) * math.log(1 + self.zoom))
        fx = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(ang) * zoom, torch.sin(ang) * zoom
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1] = cos * fx, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin * fx, cos
        theta[:, :, 2] = (torch.rand(n, 2, device=x.device) * 2 - 1) * self.shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        ones = torch.ones(n, 1, *x.shape[2:], device=x.device)
        out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)
        inside = out[:, 3:]
        # background: the brightest 8x8 patch (a cheap stand-in for the 99th percentile)
        bg = F.avg_pool2d(x, 8).amax(dim=(2, 3), keepdim=True)
        return out[:, :3] + (1 - inside) * bg

    # -- stain and colour
    def stain_jitter(self, x):
        """Per-channel optical-density scale and shift: stain strength and hue."""
        n = x.shape[0]
        od = -torch.log((x + 1) / 256)
        a = 1 + (torch.rand(n, 3, 1, 1, device=x.device) * 2 - 1) * self.stain
        b = (torch.rand(n, 3, 1, 1, device=x.device) * 2 - 1) * self.stain * 0.2
        return torch.exp(-(od * a + b)) * 256 - 1

    def colour_jitter(self, x):
        n, c = x.shape[0], self.color
        r = lambda *s: 1 + (torch.rand(*s, device=x.device) * 2 - 1) * c  # noqa: E731
        x = x * r(n, 1, 1, 1) * (1 + (torch.rand(n, 3, 1, 1, device=x.device) * 2 - 1) * c / 2)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * r(n, 1, 1, 1) + mean
        gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        x = ((x - gray) * r(n, 1, 1, 1) + gray).clamp(0, 255)
        gamma = torch.exp((torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * c)
        return 255 * (x / 255) ** gamma

    # -- optics
    def blur(self, x):
        pick = torch.rand(x.shape[0], device=x.device) < self.p_blur
        if not pick.any():
            return x
        sigma = float(torch.empty(1).uniform_(0.4, 1.6))
        k = torch.arange(-3, 4, dtype=torch.float32, device=x.device)
        k = torch.exp(-k ** 2 / (2 * sigma ** 2))
        k = (k / k.sum()).view(1, 1, 1, 7).repeat(3, 1, 1, 1)
        y = x[pick]
        y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), k, groups=3)
        y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3), groups=3)
        x = x.clone()
        x[pick] = y
        return x

    def low_resolution(self, x):
        pick = torch.rand(x.shape[0], device=x.device) < self.p_lowres
        if not pick.any():
            return x
        s = x.shape[-1]
        low = max(8, int(s * float(torch.empty(1).uniform_(self.min_res, 0.9))))
        y = F.interpolate(x[pick], size=(low, low), mode="bilinear", antialias=True,
                          align_corners=False)
        x = x.clone()
        x[pick] = F.interpolate(y, size=(s, s), mode="bilinear", align_corners=False)
        return x

    def jpeg(self, x):
        """JPEG recompression at a random quality (PIL: the codec other labs' files went through)."""
        from PIL import Image
        pick = np.flatnonzero(np.random.rand(x.shape[0]) < self.p_jpeg)
        if not len(pick):
            return x
        x = x.clone()
        for i in pick:
            a = x[i].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=int(np.random.randint(30, 90)))
            b = np.asarray(Image.open(buf).convert("RGB"))
            x[i] = torch.from_numpy(b.copy()).permute(2, 0, 1).float().to(x.device)
        return x


class TurnAugment(DomainAugment):
    """For a handful of cells: exact flips and 90-degree turns (no resampling, no padding:
    the few labelled cells are seen in every orientation as they are) plus DomainAugment's
    stain and colour jitter; no zoom, blur or resolution loss."""

    def _augment(self, x):
        n = x.shape[0]
        flip = (torch.rand(n, device=x.device) < 0.5).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
        turns = torch.randint(0, 4, (n,), device=x.device)
        out = x.clone()
        for k in range(1, 4):
            pick = turns == k
            if pick.any():
                out[pick] = torch.rot90(x[pick], k, dims=(2, 3))
        out = self.colour_jitter(self.stain_jitter(out))
        return out.clamp(0, 255).contiguous(memory_format=torch.channels_last)
