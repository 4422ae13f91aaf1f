"""``TrainConfig``: the settings of one training run, and the single source of
``bloodcell train``'s options. No torch here: the command line builds its parser
from these fields (type, default, ``help``/``choices`` metadata) without loading
PyTorch, so that ``bloodcell predict`` on ONNX Runtime starts fast."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .data import DEFAULT_FRACTIONS, DEFAULT_SEED

PER_MODEL = " (default: the model's own, from its registration in models.py)"


def option(default=None, help: str | None = None, **cli):
    """A field with its command-line option: ``help``, ``choices``, ``flag`` (the option's
    name when it is not --field-name), ``hidden``, ``required``, ``range`` ((lo, hi, lo_open):
    checked by the parser and by ``TrainConfig.check``), or ``cli=False`` for none."""
    return field(default=default, metadata={"help": help, **cli})


def range_text(lo: float, hi: float | None = None, lo_open: bool = False) -> str:
    if lo == -math.inf and hi is None:
        return "a finite number"
    return (f"over {lo:g}" if lo_open else f"{lo:g} or more") if hi is None else (
        f"over {lo:g} and at most {hi:g}" if lo_open else f"{lo:g} to {hi:g}")


def in_range(v: float, lo: float, hi: float | None = None, lo_open: bool = False) -> bool:
    return math.isfinite(v) and v >= lo and not (lo_open and v == lo) and (hi is None or v <= hi)


@dataclass
class TrainConfig:
    """Unset (None) hyper-parameters take the model's registered defaults (``resolved``)."""
    model: str = field(metadata={"help": "architecture name (see `bloodcell models`)"})
    data: str = field(metadata={"required": False, "help": "dataset folder of class sub-folders "
                                "(default: ../shared/data/pbc)"})
    out: str = field(metadata={"help": "run folder (checkpoints, logs, model files)"})
    epochs: int | None = option(range=(1,), help="maximum number of epochs" + PER_MODEL)
    batch_size: int | None = option(range=(1,), help="images per step" + PER_MODEL)
    lr: float | None = option(range=(0,), help="peak learning rate" + PER_MODEL)
    image_size: int | None = option(range=(16,), help="side of the square input in pixels" + PER_MODEL)
    patience: int | None = option(range=(0,), help="early stopping patience on val accuracy, 0 = off" + PER_MODEL)
    weight_decay: float | None = option(range=(0,), help="weight decay" + PER_MODEL)
    label_smoothing: float | None = option(range=(0, 0.99), help="label smoothing of the loss" + PER_MODEL)
    schedule: str | None = option(choices=["constant", "onecycle"],
                                  help="learning-rate schedule" + PER_MODEL)
    optimizer: str | None = option(choices=["adam", "adamw"], help="optimizer" + PER_MODEL)
    ema: float | None = option(range=(0, 0.99999), help="keep an exponential moving average of the weights with "
                               "this decay per step (e.g. 0.998) and validate/save it; 0 = off")
    subclass_aux: float | None = option(range=(0,), help="weight of an auxiliary loss on file-name sub-types "
                                        "(PBC: BNE/SNE neutrophils, PMY/MY/MMY ig), training only; 0 = off")
    distill: str | None = option(help="a teacher's predictions.csv (`bloodcell evaluate --model TEACHER "
                                 "--out DIR`) covering the training images, or several, comma-separated "
                                 "(cross-fitted teachers: scripts/crossfit_splits.py): learn its "
                                 "probabilities as well as the labels (distill.py)")
    distill_weight: float = option(0.5, range=(0, 1),
                                   help="share of the distillation term in the loss (with --distill)")
    distill_temperature: float = option(2.0, range=(0, None, True), help="temperature of the teacher and student "
                                        "probabilities in the distillation term")
    mix: str = option("none", choices=["none", "cutmix", "mixup"],
                      help="label-mixing augmentation within a batch (mixing.py): CutMix or MixUp")
    mix_alpha: float = option(1.0, range=(0, None, True), help="Beta(alpha, alpha) of the mixing weight (with --mix)")
    mix_prob: float = option(0.5, range=(0, 1), help="share of batches mixed (with --mix)")
    framing: bool | dict | None = option(cli=False)  # cell-centred framing (locate.Framing fields); per model
    seed: int = option(DEFAULT_SEED, range=(0,), help="seed of initialisation, shuffling and augmentation")
    split_seed: int = option(DEFAULT_SEED, range=(0,), help="seed of the train/val/test split")
    split_file: str | None = option(help="reuse a split manifest (split.csv of another run)")
    fractions: tuple = option(DEFAULT_FRACTIONS, cli=False)
    precision: str = option("auto", choices=["auto", "fp32", "bf16"],
                            help="auto: bf16 where it is faster on this machine, else fp32")
    # True, False or a local weights file: two options (--weights, --no-pretrained) in cli/train.py
    pretrained: bool | str = option(True, cli=False)
    cache_dir: str | None = option(help="decoded-image cache (default ~/.cache/bloodcell)")
    resume: bool = option(False, help="continue an interrupted run in --out")
    max_steps_per_epoch: int | None = option(hidden=True)  # for smoke tests
    progress: bool = option(True, flag="--no-progress", help="no progress bars")
    extra: dict = field(default_factory=dict, metadata={"cli": False})  # create_model keywords

    def check(self) -> "TrainConfig":
        """Every set value in its field's range (the Python API gets the parser's checks)."""
        for f in fields(self):
            v, r = getattr(self, f.name), f.metadata.get("range")
            if r is not None and v is not None and not in_range(v, *r):
                raise ValueError(f"--{f.name.replace('_', '-')} {v} is out of range (must be {range_text(*r)})")
        return self

    def resolved(self) -> "TrainConfig":
        """Fill unset hyper-parameters with the model's registered defaults."""
        from .models import get_spec  # torch: only when a run is set up, not for the parser
        d = get_spec(self.model).defaults
        out = TrainConfig(**asdict(self))
        for k in ("epochs", "batch_size", "lr", "image_size", "patience", "weight_decay",
                  "label_smoothing", "schedule", "optimizer", "ema", "subclass_aux", "framing"):
            if getattr(out, k) is None:
                setattr(out, k, d[k])
        return out
