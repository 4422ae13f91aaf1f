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

import json
import logging
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from . import distributed as dist
from .models import create_model, get_spec, library_versions, save_model
from .locate import Framing
from .transforms import PREPROCESS_DESCRIPTION, PREPROCESS_VERSION, to_tensor

log = logging.getLogger("bloodcell")


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    image_size: int | None = None
    patience: int | None = None          # early stopping on val accuracy; 0 = off
    weight_decay: float | None = None
    label_smoothing: float | None = None
    schedule: str | None = None          # constant | onecycle
    optimizer: str | None = None         # adam | adamw
    ema: float | None = None             # decay of a weight EMA that is validated and saved; 0 = off
    subclass_aux: float | None = None    # weight of an auxiliary file-name sub-type head; 0 = off
    framing: bool | None = None          # cell-centred framing (bloodcell.locate) in the preprocessing
    seed: int = D.DEFAULT_SEED
    split_seed: int = D.DEFAULT_SEED
    split_file: str | None = None
    fractions: tuple = D.DEFAULT_FRACTIONS
    precision: str = "auto"              # auto | fp32 | bf16
    pretrained: bool | str = True        # True, False or a local weights file
    cache_dir: str | None = None
    resume: bool = False
    max_steps_per_epoch: int | None = None   # for smoke tests
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """Fill unset hyper-parameters with the model's registered defaults."""
        d = get_spec(self.model).defaults
        out = TrainConfig(**asdict(self))
        for k in ("epochs", "batch_size", "lr", "image_size", "patience", "weight_decay",
                  "label_smoothing", "schedule", "optimizer", "ema", "subclass_aux", "framing"):
            if getattr(out, k) is None:
                setattr(out, k, d[k])
        return out


# ----------------------------------------------------------------------------- helpers

def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 autocast pays off only then (elsewhere it is emulated, slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_device_precision(precision: str = "auto"):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
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
    key = f"{_cpu_name()}|torch {torch.__version__}|{key or type(model).__name__}|{tuple(x.shape)}"
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
    log.info("precision auto: one step takes %.2fs in fp32, %.2fs in bf16: using %s",
             times["fp32"], times["bf16"], best)
    D.atomic_write_json(cache, {**known, key: best})
    return best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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


@torch.inference_mode()
def predict_proba_arrays(model, images: np.ndarray, batch_size: int = 128, device=None,
                         precision: str = "fp32", temperature: float = 1.0,
                         progress: bool = False) -> np.ndarray:
    """Class probabilities for uint8 images [N,S,S,3] (the evaluation path)."""
    from tqdm import tqdm
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), disable=not progress, desc="predicting",
                  unit="batch", mininterval=1.0):
        x = to_tensor(np.asarray(images[i:i + batch_size])).to(device)
        with autocast(device, precision):
            logits = model(x)
        out.append(torch.softmax(logits.float() / temperature, dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)


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


def _save_training_state(run: Path, model, opt, epoch, history, best, extra=None):
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
        "epoch": epoch, "history": history, "best": best,
        "param_groups": osd["param_groups"], "numpy_rng": _np_rng_to_json()})


def _np_rng_to_json():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _load_training_state(run: Path, model, opt, extra=None):
    from safetensors.torch import load_file
    meta = json.loads((run / "checkpoint" / "last.json").read_text())
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
    return meta


def prepare_data(cfg: TrainConfig, run: Path | None = None):
    """Scan, split (or reuse a manifest), load cached images. Shared with evaluate/study."""
    ds = D.scan(cfg.data)
    images, cache_info = D.load_images(ds, cfg.image_size, cfg.cache_dir, progress=cfg.progress,
                                       framing=Framing() if cfg.framing else None)
    if cfg.split_file:
        splits = D.apply_manifest(ds, D.read_manifest(Path(cfg.split_file)))
    else:
        splits = D.make_split(ds, cfg.fractions, cfg.split_seed)
    manifest_hash = None
    if run is not None:
        manifest_hash = D.write_manifest(run / "split.csv", ds, splits)
    return ds, images, splits, cache_info, manifest_hash


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, tracker=None) -> dict:
    """``tracker``: a ``tracking.Tracker`` (parameters, each epoch's record, the run's files).
    Under torchrun every rank runs this (see ``bloodcell.distributed``); rank 0 writes."""
    from .tracking import Tracker
    world = dist.from_env()
    try:
        return _train(cfg, tracker if tracker is not None and world.main else Tracker.off(), world)
    finally:
        dist.stop(world)


def _train(cfg: TrainConfig, tracker, world: dist.World) -> dict:
    cfg = cfg.resolved()
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    device, precision = choose_device_precision(cfg.precision)
    device = dist.start(world) or device
    if not world.main:  # the other ranks compute; rank 0 reports
        log.setLevel(logging.WARNING)
        cfg.progress = False
    log.info("training %s on %s (%s, %d threads)\n%s", cfg.model, device, precision,
             torch.get_num_threads(), json.dumps(asdict(cfg), indent=1))
    seed_everything(cfg.seed)

    # ---- data
    if cfg.resume and (run / "split.csv").exists() and not cfg.split_file:
        cfg.split_file = str(run / "split.csv")  # a resumed run keeps its own split
    if not world.main:
        dist.barrier(world)  # rank 0 builds the image cache once; the others then load it
    ds, images, splits, cache_info, manifest_hash = prepare_data(cfg, run if world.main else None)
    if world.main:
        dist.barrier(world)
    tr, va = D.split_indices(splits, "train"), D.split_indices(splits, "val")
    if len(tr) == 0:
        raise ValueError("the training split is empty")
    y = torch.from_numpy(ds.labels)
    log.info("%d images (%d train / %d val / %d test), %d skipped; cache %s in %.1fs",
             len(ds), len(tr), len(va), len(D.split_indices(splits, "test")), len(ds.skipped),
             "built" if cache_info["built"] else "loaded", cache_info["seconds"])

    # ---- model and optimiser
    model = create_model(cfg.model, len(ds.classes), cfg.image_size, pretrained=cfg.pretrained,
                         **cfg.extra).to(device).to(memory_format=torch.channels_last)
    if cfg.precision == "auto" and precision == "bf16" and device.type == "cpu":
        probe = tr[:cfg.batch_size]
        precision = probe_precision(model, to_tensor(images[probe]), y[torch.as_tensor(probe)], device,
                                    key=f"{cfg.model}@{cfg.image_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    # Auxiliary sub-type head (band vs segmented neutrophil, pro-/myelo-/metamyelocyte):
    # a finer target on the pooled features during training only; the saved model
    # keeps its 8-class head, so prediction and export do not change.
    aux, feats = None, {}
    if cfg.subclass_aux:
        if world.distributed:
            raise ValueError("--subclass-aux is not available under torchrun; train it in one process")
        if not hasattr(model, "head") or not hasattr(model, "dropout"):
            raise ValueError(f"--subclass-aux needs a Classifier model, not {cfg.model}")
        sub_names, sub_y = D.subclass_labels(ds)
        sub_y = torch.from_numpy(sub_y)
        aux = torch.nn.Linear(model.head.in_features, len(sub_names)).to(device)
        model.dropout.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
        params += list(aux.parameters())
        log.info("auxiliary sub-types (weight %g): %s", cfg.subclass_aux, ", ".join(sub_names))
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Polyak/EMA weights: an average over the last ~1/(1-decay) steps is a cheap
    # ensemble along the trajectory; it is the model that gets validated and saved.
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=False)
    extra = {k: v for k, v in (("ema", ema), ("aux", aux)) if v is not None}
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    if world.distributed and 0 < len(tr) % cfg.batch_size < 2 * world.size:
        steps_per_epoch -= 1  # a last batch too small for every rank to get 2 images
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs

    history: list[dict] = []
    best = {"val_accuracy": -1.0, "epoch": 0}
    start_epoch = 1
    if cfg.resume and (run / "checkpoint" / "last.json").exists():
        state = _load_training_state(run, model, opt, extra)
        history, best, start_epoch = state["history"], state["best"], state["epoch"] + 1
        log.info("resumed from epoch %d (best val acc %.4f at epoch %d)", state["epoch"],
                 best["val_accuracy"], best["epoch"])
    if world.rank:  # each rank its own augmentation draws (DDP gives all rank 0's weights)
        torch.manual_seed(cfg.seed * 1000 + 7919 * world.rank + start_epoch)
    net = dist.wrap(model, world, device)

    meta = {
        "architecture": cfg.model, "classes": ds.classes, "image_size": cfg.image_size,
        "preprocess": {"version": PREPROCESS_VERSION, "description": PREPROCESS_DESCRIPTION,
                       "framing": Framing().to_dict() if cfg.framing else None},
        "input": "float32 NCHW RGB 0..255 (normalisation inside the model)",
        "temperature": 1.0, "train_args": {**asdict(cfg), "precision": precision},
        "data": {"root": str(ds.root), "n_images": len(ds), "skipped": ds.skipped,
                 "class_counts": ds.class_counts(),
                 "split_counts": {s: int(len(D.split_indices(splits, s))) for s in D.SPLITS}},
        "split_manifest_sha1": manifest_hash, "library_versions": library_versions(),
    }
    if aux is not None:
        meta["auxiliary_subclasses"] = sub_names
    tracker.params({**meta["train_args"], "data": meta["data"]["split_counts"]})
    for rec in history:  # a resumed run's earlier epochs: the tracked curve is whole
        tracker.metrics(rec, step=rec["epoch"])

    # Ctrl-C / SIGTERM finish the current step, then save: --resume continues from there
    stop = {"flag": False}

    def _graceful(signum, frame):
        stop["flag"] = True
        log.warning("signal %d: stopping after this epoch's checkpoint", signum)
    old = {s: signal.signal(s, _graceful) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading_main() else {}

    from tqdm import tqdm
    bad_epochs = 0 if not history else (history[-1]["epoch"] - best["epoch"])
    step = (start_epoch - 1) * steps_per_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if cfg.patience and bad_epochs >= cfg.patience:
                break
            model.train()
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            order = tr[torch.randperm(len(tr), generator=g).numpy()]
            t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
                       disable=not cfg.progress, mininterval=2.0)
            for b in bar:
                idx = dist.shard(np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size]), world)
                x = to_tensor(images[idx]).to(device)
                target = y[idx].to(device)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total_steps, cfg.lr, cfg.schedule)
                with autocast(device, precision):
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                    if aux is not None:
                        loss = loss + cfg.subclass_aux * F.cross_entropy(
                            aux(feats["x"]).float(), sub_y[idx].to(device),
                            label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update_parameters(model)
                step += 1
                seen += len(idx)
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == target).sum())
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                if world.distributed:  # a signal seen by any rank stops all at the same step
                    stop["flag"] = dist.total([float(stop["flag"])], world, device)[0] > 0
                if stop["flag"]:
                    break
            bar.close()
            loss_sum, correct, seen = dist.total([loss_sum, correct, seen], world, device)
            seen = int(seen)
            if stop["flag"] and seen < min(len(tr), steps_per_epoch * cfg.batch_size):
                log.warning("interrupted mid-epoch %d: last completed epoch %d is checkpointed",
                            epoch, epoch - 1)
                break
            train_time = time.perf_counter() - t0
            keep = ema.module if ema is not None else model  # the network that is validated and saved
            # rank 0 validates; DDP hands its re-estimated BatchNorm statistics to the others
            val_acc, val_loss = dist.total(list(_validate(keep, images, tr, va, ds.labels, device,
                                                          precision, epoch)) if world.main else
                                           [0.0, 0.0], world, device)
            rec = {"epoch": epoch, "train_loss": round(loss_sum / seen, 5),
                   "train_accuracy": round(correct / seen, 5), "val_loss": round(val_loss, 5),
                   "val_accuracy": round(val_acc, 5), "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 1),
                   "images_per_s": round(seen / train_time, 1)}
            if ema is not None and world.main:  # the raw weights too, to see what the average adds
                rec["val_accuracy_raw"] = round(_validate(model, images, tr, va, ds.labels, device,
                                                          precision, epoch)[0], 5)
            history.append(rec)
            tracker.metrics(rec, step=epoch)
            log.info("epoch %d: %s", epoch, json.dumps(rec))
            improved = val_acc > best["val_accuracy"] or not len(va)
            if improved:
                best = {"val_accuracy": val_acc, "epoch": epoch}
                bad_epochs = 0
            else:
                bad_epochs += 1
            if world.main:
                _write_history(run, history)
                if improved:
                    save_model(keep, {**meta, "history": history, "best": best}, run)
                _save_training_state(run, model, opt, epoch, history, best, extra)
            if stop["flag"]:
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)

    done = not stop["flag"]
    summary = {"run": str(run), "best": best, "epochs_run": len(history), "finished": done,
               "history": history, "precision": precision, "cache": cache_info,
               "processes": world.size}
    if not world.main:
        return summary
    if done:
        # keep the metadata in sync with the full history; weights stay the best epoch's
        from .modelfile import resolve_model_path
        _, j = resolve_model_path(run)
        m = json.loads(j.read_text())
        m.update(history=history, best=best, finished=True)
        D.atomic_write_json(j, m)
    D.atomic_write_json(run / "train_summary.json", summary)
    tracker.artifacts([run / n for n in ("model.json", "train_summary.json", "history.jsonl",
                                         "split.csv")])
    return summary


def _validate(model, images, tr, va, labels, device, precision, epoch) -> tuple[float, float]:
    """(accuracy, log loss) on the val split, after precise-BN on training images."""
    if not len(va):
        return float("nan"), float("nan")
    recalibrate_bn(model, images, tr, device=device, precision=precision, seed=epoch)
    probs = predict_proba_arrays(model, images[va], device=device, precision=precision)
    acc = float((probs.argmax(1) == labels[va]).mean())
    loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                            torch.from_numpy(labels[va])))
    return acc, loss


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _write_history(run: Path, history: list[dict]):
    """history.jsonl + history.csv, one line per epoch, rewritten whole (atomic, resume-safe)."""
    D.atomic_write_text(run / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    cols = list(history[0])
    D.atomic_write_text(run / "history.csv", ",".join(cols) + "\n" + "".join(
        ",".join(str(r.get(c, "")) for c in cols) + "\n" for r in history))
