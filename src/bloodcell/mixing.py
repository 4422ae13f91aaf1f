"""Label-mixing augmentation within a training batch (``bloodcell train --mix``).

- CutMix (Yun et al. 2019): a box of a partner image is pasted in; the labels are
  mixed by the box's share of the area;
- MixUp (Zhang et al. 2018): the two images are blended, the labels by the same weight.

Each batch is mixed with probability ``prob``; the partner of image i is image
``perm[i]`` of the same batch, the mixing weight ``lam ~ Beta(alpha, alpha)`` (for
CutMix, the kept area after the box is clipped to the image). The loss is
``lam * CE(y) + (1 - lam) * CE(y[perm])``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MIX_KINDS = ("none", "cutmix", "mixup")


@dataclass
class Mixed:
    perm: torch.Tensor  # partner of each image in the batch
    lam: float          # share of each image's own label


def mix_batch(x: torch.Tensor, kind: str, alpha: float, prob: float,
              g: torch.Generator) -> tuple[torch.Tensor, Mixed | None]:
    """(a mixed copy of the batch, or the batch itself; how it was mixed, or None). ``alpha`` > 0."""
    if kind not in MIX_KINDS:
        raise ValueError(f"mix {kind!r}: use one of {', '.join(MIX_KINDS)}")
    if kind == "none" or len(x) < 2 or float(torch.rand(1, generator=g)) >= prob:
        return x, None
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))  # torch's Beta takes no generator
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=g).to(x.device)
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], Mixed(perm, lam)
    h, w = x.shape[-2:]
    ch, cw = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, Mixed(perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w))


def mixed_loss(logits: torch.Tensor, target: torch.Tensor, mixed: Mixed | None,
               label_smoothing: float) -> torch.Tensor:
    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if mixed is None:
        return loss
    other = F.cross_entropy(logits, target[mixed.perm], label_smoothing=label_smoothing)
    return mixed.lam * loss + (1 - mixed.lam) * other
