"""Saliency maps for one preprocessed image: Grad-CAM on the model's last
spatial feature map (or gradient x input for models without one), rendered as
a PNG overlay for the review page. Computed on request, never stored.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from .transforms import to_tensor


def target_layer(model: nn.Module) -> nn.Module | None:
    """The layer whose output Grad-CAM explains: a registry ``Classifier``'s
    backbone (its last, post-activation feature map), else the last Conv2d."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return backbone
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def gradcam(model: nn.Module, image: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, int]:
    """uint8 (S, S, 3) preprocessed image -> (heat map (S, S) in 0..1, explained class).

    ``model`` must be in eval mode and not used by another thread meanwhile
    (the hook is attached for the duration of one call)."""
    x = to_tensor(np.array(image[None])).requires_grad_(True)  # graph exists even with frozen weights
    layer = target_layer(model)
    acts: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        acts.append(out)
        # a clone, so an in-place ReLU that follows cannot overwrite what we differentiate
        return out.clone()

    handle = layer.register_forward_hook(hook) if layer is not None else None
    try:
        with torch.enable_grad():
            logits = model(x)
            idx = int(logits[0].argmax()) if class_index is None else int(class_index)
            score = logits[0, idx]
            if acts and acts[-1].dim() == 4 and min(acts[-1].shape[-2:]) > 1:
                a = acts[-1]
                (g,) = torch.autograd.grad(score, a)
                weights = g.mean(dim=(2, 3), keepdim=True)          # Grad-CAM channel weights
                cam = torch.relu((weights * a).sum(1, keepdim=True))
                cam = torch.nn.functional.interpolate(cam, size=image.shape[:2], mode="bilinear",
                                                      align_corners=False)[0, 0]
            else:  # no spatial layer (e.g. the dense net): |gradient x input|
                (g,) = torch.autograd.grad(score, x)
                cam = (g * x).abs().sum(1, keepdim=True)
                cam = torch.nn.functional.avg_pool2d(cam, 5, stride=1, padding=2)[0, 0]
    finally:
        if handle is not None:
            handle.remove()
    cam = cam.detach().float().numpy()
    cam -= cam.min()
    peak = cam.max()
    return (cam / peak if peak > 0 else cam), idx


def overlay_png(base: Image.Image | np.ndarray, heat: np.ndarray, size: int = 320,
                alpha: float = 0.45) -> bytes:
    """Blend a jet-coloured heat map over ``base`` (centre-cropped to square) -> PNG bytes."""
    from matplotlib import colormaps
    im = base if isinstance(base, Image.Image) else Image.fromarray(base)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
    hm = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    h01 = np.asarray(hm, dtype=np.float32) / 255.0
    colour = colormaps["jet"](h01)[..., :3] * 255.0
    # weak saliency stays transparent so the cell itself remains readable
    a = (alpha * np.clip((h01 - 0.15) / 0.5, 0, 1))[..., None]
    out = np.asarray(im, dtype=np.float32) * (1 - a) + colour * a
    buf = io.BytesIO()
    Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()
