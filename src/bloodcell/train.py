"""Training engine: one readable loop, top to bottom.

scan data -> split (manifest) -> cached images -> model -> epochs of
(shuffle, augment inside the model, step, validate, log, checkpoint) ->
best weights saved as model.safetensors + model.json.

Determinism: with the same seed, data and thread count, a CPU run repeats
bit for bit (shuffling, augmentation and init all draw from seeded torch/numpy
generators; the RNG state is checkpointed so --resume continues the same
stream). Different thread counts or CPUs can change float summation order,
so the last digits of losses may differ across machines.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import cpu
from . import data as D
from . import distributed as dist
from .distill import SoftTargets, TeacherFile, check_settings
from .mixing import mix_batch, mixed_loss
from .locate import Framing
from .modelfile import ModelFile, resolve_model_path
from .models import create_model, library_versions, save_model
from .runtime import TorchRunner, autocast, batched_logits, softmax
from .trainconfig import TrainConfig
from .transforms import PREPROCESS_DESCRIPTION, PREPROCESS_VERSION, to_tensor

log = logging.getLogger("bloodcell")


# ----------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def machine_name(device: torch.device) -> str:
    """What trained an epoch (history.jsonl, the study's table): the GPU's name, or the
    CPU model and its core count (epoch times mean little without it). Read once per device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = ", AMX/AVX512-bf16" if cpu.has_native_bf16() else ""
    return f"{cpu.cpu_model()} ({os.cpu_count()} cores{bf16})"


def choose_device_precision(precision: str = "auto"):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16" if cpu.has_native_bf16() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    return device, precision


def probe_precision(model, x: torch.Tensor, y: torch.Tensor, device, key: str | None = None) -> str:
    """"auto" on a CPU with native bf16: time a training step of THIS model in each
    precision on a real batch and keep the faster. Native bf16 (AMX) speeds up dense
    convolutions ~3x, but measured here EfficientNet-Lite0 at 128 px ran slower in bf16
    (1.4 vs 0.9 s per 48-image step on a 2-core Xeon with AMX): its depthwise layers
    gain nothing and pay for the casts. A copy of the model is timed under a forked RNG,
    so the real model and the random streams are untouched; the choice is cached per
    CPU and ``key`` (model, size, batch) so that reruns (and --resume) choose the same."""
    import copy
    cache = D.default_cache_dir() / "precision.json"
    key = f"{cpu.cpu_model()}|torch {torch.__version__}|{key or type(model).__name__}|{tuple(x.shape)}"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key in known:
        return known[key]
    probe = copy.deepcopy(model).train()
    x, y = x.to(device), y.to(device)
    times = {}
    with torch.random.fork_rng(devices=[]):
        for precision in ("fp32", "bf16"):
            for _ in range(2):  # the first step pays one-time costs (kernel selection)
                t0 = time.perf_counter()
                with autocast(device, precision):
                    loss = F.cross_entropy(probe(x), y)
                loss.backward()
                probe.zero_grad(set_to_none=True)
            times[precision] = time.perf_counter() - t0
    best = min(times, key=times.get)
    log.info("precision auto: one step takes %.0f ms in fp32, %.0f ms in bf16: using %s",
             1e3 * times["fp32"], 1e3 * times["bf16"], best)
    D.atomic_write_json(cache, {**known, key: best})
    return best


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, base_lr: float, schedule: str) -> float:
    """LR as a pure function of the step, so a resumed run needs no scheduler state."""
    if schedule == "constant":
        return base_lr
    if schedule == "onecycle":  # linear warm-up over 10 %, cosine down to ~0
        warm = max(1, int(0.1 * total))
        if step < warm:
            return base_lr * (0.04 + 0.96 * step / warm)
        t = (step - warm) / max(1, total - warm)
        return base_lr * (0.5 * (1 + math.cos(math.pi * min(t, 1.0)))) + base_lr * 1e-3
    raise ValueError(f"unknown schedule {schedule!r}: use constant or onecycle")


@torch.no_grad()
def recalibrate_bn(model, images: np.ndarray, idx: np.ndarray, batch_size: int = 64,
                   max_images: int = 1536, device=None, precision: str = "fp32", seed: int = 0) -> bool:
    """Re-estimate BatchNorm running statistics on un-augmented training images
    ("precise BN"). Running averages lag behind weights that change fast during
    fine-tuning, which makes eval-mode accuracy (and early stopping) misleading.
    Returns False when the model has no trainable-statistics BN layer."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or getattr(model, "frozen", False):
        return False
    device = device or next(model.parameters()).device
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(idx)[:max_images])
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    aug = getattr(model, "augment", None)
    if aug is not None:
        aug.eval()  # statistics of the images the model will see at inference
    for i in range(0, len(pick), batch_size):
        x = to_tensor(images[pick[i:i + batch_size]]).to(device)
        with autocast(device, precision):
            model(x)
    for m, mom in saved.items():
        m.momentum = mom
    model.eval()
    return True


# ----------------------------------------------------------------------------- the run's parts

@dataclass
class TrainData:
    """The dataset, its split and its decoded images (the same for every rank)."""
    ds: D.Dataset
    images: np.ndarray       # uint8 [N,S,S,3], memory-mapped from the cache
    splits: list[str]
    cache_info: dict
    manifest_hash: str | None
    tr: np.ndarray = field(init=False)
    va: np.ndarray = field(init=False)
    y: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.tr, self.va = D.split_indices(self.splits, "train"), D.split_indices(self.splits, "val")
        self.y = torch.from_numpy(self.ds.labels)

    def split_counts(self) -> dict[str, int]:
        return {s: int(len(D.split_indices(self.splits, s))) for s in D.SPLITS}


class SubtypeHead:
    """Auxiliary sub-type head (band vs segmented neutrophil, pro-/myelo-/metamyelocyte):
    a finer target on the pooled features during training only; the saved model keeps
    its 8-class head, so prediction and export do not change."""

    def __init__(self, model, ds: D.Dataset, weight: float, label_smoothing: float, device):
        self.names, sub_y = D.subclass_labels(ds)
        self.y = torch.from_numpy(sub_y)
        self.linear = torch.nn.Linear(model.head.in_features, len(self.names)).to(device)
        self.weight, self.label_smoothing, self.device = weight, label_smoothing, device
        self._features = None
        model.dropout.register_forward_hook(self._keep_features)

    def _keep_features(self, module, inputs, output):
        self._features = output

    def loss(self, idx) -> torch.Tensor:
        """The weighted sub-type loss of the batch the model has just seen."""
        return self.weight * F.cross_entropy(self.linear(self._features).float(), self.y[idx].to(self.device),
                                             label_smoothing=self.label_smoothing)

    @classmethod
    def for_run(cls, cfg: TrainConfig, model, ds: D.Dataset, world: dist.World, device):
        """The head ``cfg.subclass_aux`` asks for, or None."""
        if not cfg.subclass_aux:
            return None
        if world.distributed:
            raise ValueError("--subclass-aux is not available under torchrun; train it in one process")
        if not hasattr(model, "head") or not hasattr(model, "dropout"):
            raise ValueError(f"--subclass-aux needs a Classifier model, not {cfg.model}")
        head = cls(model, ds, cfg.subclass_aux, cfg.label_smoothing, device)
        log.info("auxiliary sub-types (weight %g): %s", cfg.subclass_aux, ", ".join(head.names))
        return head


class WeightEMA:
    """Polyak/EMA weights: an average over the last ~1/(1-decay) steps is a cheap
    ensemble along the trajectory; it is the model that gets validated and saved."""

    def __init__(self, model, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)

    def update(self, model) -> None:
        self.averaged.update_parameters(model)

    @property
    def module(self):
        return self.averaged.module


@dataclass
class Trainer:
    """What every epoch uses: settings, data, the network and its optimiser."""
    cfg: TrainConfig
    world: dist.World
    device: torch.device
    precision: str
    data: TrainData
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: WeightEMA | None
    aux: SubtypeHead | None
    soft: SoftTargets | None  # a teacher's probabilities (--distill)
    steps_per_epoch: int
    net: torch.nn.Module | None = None  # what a step calls: the model, or DDP around it

    @property
    def machine(self) -> str:
        return machine_name(self.device)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def kept(self) -> torch.nn.Module:
        """The network that is validated and saved: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def settings(self) -> dict:
        """Settings a resumed run must keep: one run, one set of hyper-parameters."""
        hyper = {k: getattr(self.cfg, k) for k in RESUME_KEEPS}
        return {**hyper, **({"distill_teacher": self.soft.record()} if self.soft is not None else {})}

    def checkpointed(self) -> dict[str, torch.nn.Module]:
        """Modules saved beside the model and optimiser in the training checkpoint."""
        return {k: v for k, v in (("ema", self.ema and self.ema.averaged),
                                  ("aux", self.aux and self.aux.linear)) if v is not None}


@dataclass
class Progress:
    """The epochs done so far: what early stopping, the model file and --resume need."""
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_accuracy": -1.0, "epoch": 0})
    epoch: int = 0  # the last completed epoch

    @property
    def bad_epochs(self) -> int:
        """Epochs since the best one."""
        return self.epoch - self.best["epoch"] if self.history else 0

    def add(self, rec: dict, val_acc: float, has_val: bool) -> bool:
        """Record an epoch; True when it is the best so far (always, without a val split)."""
        self.history.append(rec)
        self.epoch = rec["epoch"]
        improved = val_acc > self.best["val_accuracy"] or not has_val
        if improved:
            self.best = {"val_accuracy": val_acc, "epoch": rec["epoch"]}
        return improved


@dataclass
class EpochStats:
    """Training loss and accuracy of one epoch, summed over the ranks."""
    loss_sum: float
    correct: float
    seen: int
    started: float    # time.perf_counter() at the start of the epoch
    train_seconds: float


class GracefulStop:
    """Ctrl-C / SIGTERM finish the current step, then save: --resume continues from there."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading_main():  # signal handlers can only be set from the main thread
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("signal %d: stopping after this epoch's checkpoint", signum)

    def agree(self, world: dist.World, device) -> None:
        """A signal seen by any rank stops all at the same step."""
        if world.distributed:
            self.requested = dist.total([float(self.requested)], world, device)[0] > 0


# ----------------------------------------------------------------------------- checkpoints

# what a resumed run must share with the run it continues (not epochs: a run may be extended)
RESUME_KEEPS = ("model", "image_size", "batch_size", "lr", "weight_decay", "label_smoothing",
                "schedule", "optimizer", "ema", "subclass_aux", "mix", "mix_alpha", "mix_prob", "seed")


def save_checkpoint(run: Path, model, opt, progress: Progress, extra=None, settings: dict | None = None):
    """Last completed epoch: model (+ ``extra`` modules: EMA, auxiliary head) + optimizer
    tensors in safetensors, the rest in JSON."""
    from safetensors.torch import save as st_save
    tensors = {}
    for prefix, module in {"model": model, **(extra or {})}.items():
        tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous()
                        for k, v in module.state_dict().items()})
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    D.atomic_write_bytes(run / "checkpoint" / "last.safetensors", st_save(tensors))
    D.atomic_write_json(run / "checkpoint" / "last.json", {
        "epoch": progress.epoch, "history": progress.history, "best": progress.best,
        "param_groups": osd["param_groups"], "numpy_rng": _np_rng_to_json(), "settings": settings or {}})


def _check_resume_settings(run: Path, saved: dict, now: dict) -> None:
    """The distillation must match; hyper-parameters too, where the checkpoint records them
    (those of earlier versions record the distillation only)."""
    keys = ["distill_teacher"] + [k for k in RESUME_KEEPS if k in saved]
    differ = [k for k in keys if saved.get(k) != now.get(k)]
    if differ:
        def show(d):
            return ", ".join(f"{k} {d.get(k)}" for k in differ)
        raise ValueError(f"{run}: the run started with {show(saved)}, not {show(now)}; resume with the "
                         "settings it started with, or train a new run (--overwrite or another --out)")


def _np_rng_to_json():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def load_checkpoint(run: Path, model, opt, extra=None, settings: dict | None = None) -> Progress:
    """Restore what ``save_checkpoint`` wrote, random streams included; ``settings`` (the
    run's distillation) must be those the run started with."""
    from safetensors.torch import load_file
    meta = json.loads((run / "checkpoint" / "last.json").read_text())
    _check_resume_settings(run, meta.get("settings", {}), settings or {})
    t = load_file(str(run / "checkpoint" / "last.safetensors"))
    for prefix, module in {"model": model, **(extra or {})}.items():
        sd = {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + ".")}
        if not sd:
            raise ValueError(f"{run}: the checkpoint has no {prefix!r} weights; resume with the "
                             "settings the run started with")
        module.load_state_dict(sd)
    state: dict = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(t["rng.torch"])
    s = meta["numpy_rng"]
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    log.info("resumed from epoch %d (best val acc %.4f at epoch %d)", meta["epoch"],
             meta["best"]["val_accuracy"], meta["best"]["epoch"])
    return Progress(meta["history"], meta["best"], meta["epoch"])


# ----------------------------------------------------------------------------- setting up

def prepare_data(cfg: TrainConfig, run: Path | None = None):
    """Scan, split (or reuse a manifest), load cached images. Shared with evaluate/study."""
    ds = D.scan(cfg.data)
    images, cache_info = D.load_images(ds, cfg.image_size, cfg.cache_dir, progress=cfg.progress,
                                       framing=Framing.of_config(cfg.framing))
    if cfg.split_file:
        splits = D.apply_manifest(ds, D.read_manifest(Path(cfg.split_file)))
    else:
        splits = D.make_split(ds, cfg.fractions, cfg.split_seed)
    manifest_hash = None
    if run is not None:
        manifest_hash = D.write_manifest(run / "split.csv", ds, splits)
    return ds, images, splits, cache_info, manifest_hash


def load_data(cfg: TrainConfig, run: Path, world: dist.World) -> TrainData:
    """``prepare_data`` for a run: rank 0 builds the image cache and writes the split."""
    if cfg.resume and (run / "split.csv").exists() and not cfg.split_file:
        cfg.split_file = str(run / "split.csv")  # a resumed run keeps its own split
    if not world.main:
        dist.barrier(world)  # rank 0 builds the image cache once; the others then load it
    data = TrainData(*prepare_data(cfg, run if world.main else None))
    if world.main:
        dist.barrier(world)
    if len(data.tr) == 0:
        raise ValueError("the training split is empty")
    log.info("%d images (%d train / %d val / %d test), %d skipped; cache %s in %.1fs",
             len(data.ds), len(data.tr), len(data.va), len(D.split_indices(data.splits, "test")),
             len(data.ds.skipped), "built" if data.cache_info["built"] else "loaded",
             data.cache_info["seconds"])
    return data


def build_trainer(cfg: TrainConfig, world: dist.World, device, precision: str,
                  data: TrainData, teacher: TeacherFile | None = None) -> Trainer:
    """Model, precision (probed on "auto"), auxiliary head, optimiser, EMA, steps per epoch."""
    model = create_model(cfg.model, len(data.ds.classes), cfg.image_size, pretrained=cfg.pretrained,
                         **cfg.extra).to(device).to(memory_format=torch.channels_last)
    if cfg.precision == "auto" and precision == "bf16" and device.type == "cpu":
        probe = data.tr[:cfg.batch_size]
        precision = probe_precision(model, to_tensor(data.images[probe]), data.y[torch.as_tensor(probe)],
                                    device, key=f"{cfg.model}@{cfg.image_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    aux = SubtypeHead.for_run(cfg, model, data.ds, world, device)
    if aux is not None:
        params += list(aux.linear.parameters())
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    soft = None
    if cfg.distill:
        soft = SoftTargets.read(cfg.distill, data.ds, cfg.distill_weight, cfg.distill_temperature, teacher)
        soft.check_covers(data.tr, data.ds)
        log.info("distilling from %s (weight %g, temperature %g)", cfg.distill, cfg.distill_weight,
                 cfg.distill_temperature)
    n = len(data.tr)
    steps = math.ceil(n / cfg.batch_size)
    if world.distributed and 0 < n % cfg.batch_size < 2 * world.size:
        steps -= 1  # a last batch too small for every rank to get 2 images
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    return Trainer(cfg, world, device, precision, data, model, opt, ema, aux, soft, steps)


def _framing_dict(cfg: TrainConfig) -> dict | None:
    framing = Framing.of_config(cfg.framing)
    return framing.to_dict() if framing else None


def model_metadata(t: Trainer) -> ModelFile:
    """model.json, less the history and best epoch that each save adds."""
    cfg, ds = t.cfg, t.data.ds
    return ModelFile(
        architecture=cfg.model, classes=list(ds.classes), image_size=cfg.image_size,
        preprocess={"version": PREPROCESS_VERSION, "description": PREPROCESS_DESCRIPTION,
                    "framing": _framing_dict(cfg)},
        input="float32 NCHW RGB 0..255 (normalisation inside the model)",
        temperature=1.0, train_args={**asdict(cfg), "precision": t.precision, **t.settings()},
        data={"root": str(ds.root), "n_images": len(ds), "skipped": ds.skipped,
              "class_counts": ds.class_counts(), "split_counts": t.data.split_counts()},
        split_manifest_sha1=t.data.manifest_hash, library_versions=library_versions(),
        auxiliary_subclasses=t.aux.names if t.aux is not None else None)


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(t: Trainer, epoch: int, stop: GracefulStop) -> EpochStats:
    """One pass over a fresh shuffle of the training split (stops early on a signal)."""
    cfg, data, device = t.cfg, t.data, t.device
    t.model.train()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = data.tr[torch.randperm(len(data.tr), generator=g).numpy()]
    g_mix = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 10**6 * (1 + t.world.rank))
    t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
    bar = tqdm(range(t.steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
               disable=not cfg.progress, mininterval=2.0)
    for b in bar:
        idx = dist.shard(np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size]), t.world)
        x = to_tensor(data.images[idx]).to(device)
        target = data.y[idx].to(device)
        x, mixed = mix_batch(x, cfg.mix, cfg.mix_alpha, cfg.mix_prob, g_mix)
        for group in t.opt.param_groups:  # the step's rate, a pure function of the step
            group["lr"] = lr_at((epoch - 1) * t.steps_per_epoch + b, t.total_steps, cfg.lr, cfg.schedule)
        with autocast(device, t.precision):
            logits = t.net(x)
            if t.soft is not None:
                loss = t.soft.loss(logits.float(), target, idx, cfg.label_smoothing)
            else:
                loss = mixed_loss(logits.float(), target, mixed, cfg.label_smoothing)
            if t.aux is not None:
                loss = loss + t.aux.loss(idx)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.opt.step()
        if t.ema is not None:
            t.ema.update(t.model)
        seen += len(idx)
        loss_sum += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == target).sum())
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        stop.agree(t.world, device)
        if stop.requested:
            break
    bar.close()
    loss_sum, correct, seen = dist.total([loss_sum, correct, seen], t.world, device)
    return EpochStats(loss_sum, correct, int(seen), t0, time.perf_counter() - t0)


def validate(t: Trainer, epoch: int) -> dict:
    """The epoch's validation figures. Rank 0 validates; DDP hands its re-estimated
    BatchNorm statistics to the others."""
    d = t.data
    val_acc, val_loss = dist.total(list(_validate(t.kept, d.images, d.tr, d.va, d.ds.labels, t.device,
                                                  t.precision, epoch)) if t.world.main else
                                   [0.0, 0.0], t.world, t.device)
    out = {"val_loss": val_loss, "val_accuracy": val_acc}
    if t.ema is not None and t.world.main:  # the raw weights too, to see what the average adds
        out["val_accuracy_raw"] = _validate(t.model, d.images, d.tr, d.va, d.ds.labels, t.device,
                                            t.precision, epoch)[0]
    return out


def _validate(model, images, tr, va, labels, device, precision, epoch) -> tuple[float, float]:
    """(accuracy, log loss) on the val split, after precise-BN on training images."""
    if not len(va):
        return float("nan"), float("nan")
    recalibrate_bn(model, images, tr, device=device, precision=precision, seed=epoch)
    runner = TorchRunner(model, images.shape[1], device, precision)
    probs = softmax(batched_logits(runner, images, va))
    acc = float((probs.argmax(1) == labels[va]).mean())
    loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                            torch.from_numpy(labels[va])))
    return acc, loss


def epoch_record(t: Trainer, epoch: int, stats: EpochStats, val: dict) -> dict:
    """One line of history.jsonl."""
    rec = {"epoch": epoch, "train_loss": round(stats.loss_sum / stats.seen, 5),
           "train_accuracy": round(stats.correct / stats.seen, 5), "val_loss": round(val["val_loss"], 5),
           "val_accuracy": round(val["val_accuracy"], 5), "lr": t.opt.param_groups[0]["lr"],
           "seconds": round(time.perf_counter() - stats.started, 1),
           "images_per_s": round(stats.seen / stats.train_seconds, 1), "machine": t.machine}
    if "val_accuracy_raw" in val:
        rec["val_accuracy_raw"] = round(val["val_accuracy_raw"], 5)
    return rec


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, tracker=None) -> dict:
    """``tracker``: a ``tracking.Tracker`` (parameters, each epoch's record, the run's files).
    Under torchrun every rank runs this (see ``bloodcell.distributed``); rank 0 writes."""
    from .tracking import Tracker
    world = dist.from_env()
    try:
        summary = _train(cfg, tracker if tracker is not None and world.main else Tracker.off(), world)
        dist.barrier(world)  # no rank tears the group down while rank 0 still writes
        return summary
    finally:
        dist.stop(world)


def _train(cfg: TrainConfig, tracker, world: dist.World) -> dict:
    cfg = cfg.check().resolved().check()  # before any file is written or image decoded
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    device, precision = _start(cfg, world)
    teacher = None
    if cfg.mix != "none" and (cfg.distill or cfg.subclass_aux):
        raise ValueError(f"--mix {cfg.mix} does not combine with --distill or --subclass-aux "
                         "(their targets are not mixed)")
    if cfg.distill:  # its errors before the image cache is built, not after
        check_settings(cfg.distill_weight, cfg.distill_temperature)
        teacher = TeacherFile.read(cfg.distill)
    t = build_trainer(cfg, world, device, precision, load_data(cfg, run, world), teacher)
    progress = Progress()
    if cfg.resume and (run / "checkpoint" / "last.json").exists():
        progress = load_checkpoint(run, t.model, t.opt, t.checkpointed(), t.settings())
    if world.rank:  # each rank its own augmentation draws (DDP gives all rank 0's weights)
        torch.manual_seed(cfg.seed * 1000 + 7919 * world.rank + progress.epoch + 1)
    t.net = dist.wrap(t.model, world, device)
    meta = model_metadata(t)
    tracker.params({**meta.train_args, "data": meta.data["split_counts"]})
    for rec in progress.history:  # a resumed run's earlier epochs: the tracked curve is whole
        tracker.metrics(rec, step=rec["epoch"])

    with GracefulStop() as stop:
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            if cfg.patience and progress.bad_epochs >= cfg.patience:
                break
            stats = train_one_epoch(t, epoch, stop)
            if stop.requested and stats.seen < min(len(t.data.tr), t.steps_per_epoch * cfg.batch_size):
                log.warning("interrupted mid-epoch %d: last completed epoch %d is checkpointed",
                            epoch, epoch - 1)
                break
            val = validate(t, epoch)
            rec = epoch_record(t, epoch, stats, val)
            improved = progress.add(rec, val["val_accuracy"], len(t.data.va) > 0)
            tracker.metrics(rec, step=epoch)
            log.info("epoch %d: %s", epoch, json.dumps(rec))
            if world.main:
                _write_history(run, progress.history)
                if improved:
                    save_model(t.kept, replace(meta, history=progress.history, best=progress.best), run)
                save_checkpoint(run, t.model, t.opt, progress, t.checkpointed(), t.settings())
            if stop.requested:
                break
    return _finish(t, run, progress, not stop.requested, tracker)


def _start(cfg: TrainConfig, world: dist.World) -> tuple[torch.device, str]:
    """Device and precision, this rank's logging, the seeds."""
    device, precision = choose_device_precision(cfg.precision)
    device = dist.start(world) or device
    if not world.main:  # the other ranks compute; rank 0 reports
        log.setLevel(logging.WARNING)
        cfg.progress = False
    log.info("training %s on %s (%s, %d threads)\n%s", cfg.model, device, precision,
             torch.get_num_threads(), json.dumps(asdict(cfg), indent=1))
    seed_everything(cfg.seed)
    return device, precision


def _finish(t: Trainer, run: Path, progress: Progress, done: bool, tracker) -> dict:
    """train_summary.json; a finished run's model.json gets the whole history."""
    summary = {"run": str(run), "best": progress.best, "epochs_run": len(progress.history),
               "finished": done, "history": progress.history, "precision": t.precision,
               "cache": t.data.cache_info, "processes": t.world.size}
    if not t.world.main:
        return summary
    if done:
        # keep the metadata in sync with the full history; weights stay the best epoch's
        _, j = resolve_model_path(run)
        replace(ModelFile.load(j), history=progress.history, best=progress.best, finished=True).save(j)
    D.atomic_write_json(run / "train_summary.json", summary)
    tracker.artifacts([run / n for n in ("model.json", "train_summary.json", "history.jsonl",
                                         "split.csv")])
    return summary


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _write_history(run: Path, history: list[dict]):
    """history.jsonl + history.csv, one line per epoch, rewritten whole (atomic, resume-safe)."""
    D.atomic_write_text(run / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    cols = list(history[0])
    D.atomic_write_text(run / "history.csv", ",".join(cols) + "\n" + "".join(
        ",".join(str(r.get(c, "")) for c in cols) + "\n" for r in history))
