"""The study in one command: train the six generations on one shared split,
evaluate each on train/val/test, write the report (``bloodcell.report``).

REPORT_DIR/
  split.csv            one manifest, made once, used by every generation
  study.json           settings, exact command, data summary, per-run status
  runs/<model>/        a normal training run (model.json, history.jsonl, ...)
                       + study_eval.json and test_predictions.csv
  figures/, report.md, report.html

Re-running the same command continues an interrupted study: generations with
a finished model are skipped, an unfinished one resumes from its checkpoint.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import data as D
from .modelfile import ModelFile

log = logging.getLogger("bloodcell")

# Generation 5 froze a ResNet-50; of the offline backbones Lite2 is the closest (issue 17:
# Lite0 frozen scored 80 % where the study's frozen ResNet-50 gave 93 %); lite0-frozen stays
# in the registry for the CPU-capped variant.
# generation 5 on two frozen backbones: Lite0 (the study's figure is closest) and Lite2 (the
# biggest offline backbone, closest to the study's ResNet-50 in size)
STUDY_MODELS = ["dnn", "cnn", "cnn-aug", "cnn3", "lite0-frozen", "lite2-frozen", "lite0-finetune"]
EVAL_VERSION = 1  # bump when study_eval.json's content changes


@dataclass
class StudyConfig:
    data: str
    out: str
    models: list[str] = field(default_factory=lambda: list(STUDY_MODELS))
    image_size: int | dict | None = None  # N, or model (or "*") -> px; None: each model's (224)
    epochs_cap: dict = field(default_factory=dict)   # model (or "*") -> max epochs
    seed: int = D.DEFAULT_SEED
    fractions: tuple = D.DEFAULT_FRACTIONS
    precision: str = "auto"
    cache_dir: str | None = None
    max_steps_per_epoch: int | None = None
    progress: bool = True
    command: str | None = None
    public: str | None = None            # also write the committable copy here
    screen_report: str | None = None


def _per_model(spec: str | None, option: str, what: str) -> dict:
    """'12' -> {'*': 12}; '12,lite0-finetune=6' -> {'*': 12, 'lite0-finetune': 6}."""
    from .models import get_spec
    out: dict = {}
    if not spec:
        return out
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, n = part.rpartition("=")
        try:
            value = int(n)
        except ValueError:
            raise ValueError(f"{option}: {part!r} is not N or MODEL=N") from None
        if value < 1:
            raise ValueError(f"{option}: {part!r}: need at least 1 {what}")
        if name:
            get_spec(name)  # clear error on a typo
        out[name or "*"] = value
    return out


def parse_epochs_cap(spec: str | None) -> dict:
    """'12' -> every model at most 12 epochs; '12,lite0-finetune=6' -> per-model caps."""
    return _per_model(spec, "--epochs-cap", "epoch")


def parse_image_size(spec: str | None) -> dict:
    """'128' -> every model at 128 px; '128,lite0-finetune=160' -> one model larger."""
    sizes = _per_model(spec, "--image-size", "pixel")
    for k, v in sizes.items():
        if v < 16:
            raise ValueError(f"--image-size: {k}={v} px is too small (16 at least)")
    return sizes


def parse_models(spec: str | None) -> list[str]:
    from .models import get_spec
    if not spec:
        return list(STUDY_MODELS)
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise ValueError(f"--models {spec!r} names no model")
    for m in names:
        get_spec(m)
    if len(set(names)) != len(names):
        raise ValueError(f"--models lists a model twice: {spec}")
    return names


def epochs_for(cfg: StudyConfig, model: str) -> int:
    from .models import get_spec
    default = get_spec(model).defaults["epochs"]
    cap = cfg.epochs_cap.get(model, cfg.epochs_cap.get("*"))
    return min(default, cap) if cap else default


def image_size_for(cfg: StudyConfig, model: str) -> int:
    from .models import get_spec
    size = cfg.image_size
    if isinstance(size, dict):
        size = size.get(model, size.get("*"))
    return size or get_spec(model).defaults["image_size"]


def run_finished(run: Path, epochs: int | None = None) -> bool:
    """Finished, and (given ``epochs``) not merely stopped by a lower epoch cap than now."""
    j = run / "model.json"
    if not (j.exists() and (run / "model.safetensors").exists()):
        return False
    try:
        meta = ModelFile.load(j)
    except (OSError, ValueError):  # unreadable or not a model file: not a finished run
        return False
    if not meta.finished:
        return False
    return epochs is None or not stopped_by_cap(run, meta, epochs)


def stopped_by_cap(run: Path, meta: ModelFile, epochs: int) -> bool:
    """The run ended at an epoch cap below ``epochs``, early stopping had not fired and
    its LR does not follow a schedule fixed by the epoch count: raising the cap continues it."""
    history = meta.history or []
    args = meta.train_args
    patience = args.get("patience") or 0
    best = (meta.best or {}).get("epoch", 0)
    early = patience and len(history) - best >= patience
    return (len(history) < epochs and not early and args.get("schedule") == "constant"
            and (run / "checkpoint" / "last.json").exists())


# ----------------------------------------------------------------------------- data

class _Images:
    """Dataset scanned once per image size, images from the shared decoded cache."""

    def __init__(self, cfg: StudyConfig, split_file: Path):
        self.cfg, self.split_file, self._by_size = cfg, split_file, {}

    def get(self, size: int):
        if size not in self._by_size:
            ds = D.scan(self.cfg.data)
            images, info = D.load_images(ds, size, self.cfg.cache_dir, progress=self.cfg.progress)
            splits = D.apply_manifest(ds, D.read_manifest(self.split_file))
            self._by_size[size] = (ds, images, np.array(splits), info)
        return self._by_size[size]


def prepare_split(cfg: StudyConfig, out: Path) -> tuple[Path, D.Dataset, dict]:
    """Make REPORT_DIR/split.csv once (after dropping undecodable files, exactly as
    ``train`` would); later runs of the study reuse it. Returns the data summary too."""
    split_file = out / "split.csv"
    sizes = sorted({image_size_for(cfg, m) for m in cfg.models})
    ds = D.scan(cfg.data)
    _, info = D.load_images(ds, sizes[0], cfg.cache_dir, progress=cfg.progress)
    if split_file.exists():
        splits = D.apply_manifest(ds, D.read_manifest(split_file))
        if splits != D.make_split(ds, cfg.fractions, cfg.seed):  # the report states the seed
            raise ValueError(f"{split_file}: this study folder's split was made with another seed or "
                             f"fractions than --seed {cfg.seed}; use another --out (or the seed it was made with)")
        log.info("reusing the study's split %s", split_file)
    else:
        splits = D.make_split(ds, cfg.fractions, cfg.seed)
        D.write_manifest(split_file, ds, splits)
        log.info("wrote the study's split %s", split_file)
    splits = np.array(splits)
    by_class = {}
    for i, c in enumerate(ds.classes):
        m = ds.labels == i
        by_class[c] = {s: int(((splits == s) & m).sum()) for s in D.SPLITS}
    summary = {
        "root": str(ds.root), "classes": ds.classes, "n_images": len(ds),
        "class_counts": ds.class_counts(), "split_counts": {s: int((splits == s).sum()) for s in D.SPLITS},
        "split_by_class": by_class, "skipped": ds.skipped, "split_sha1": D.manifest_sha1(split_file),
        "cache": info,
    }
    return split_file, ds, summary


# ----------------------------------------------------------------------------- train

def _same_assignment(a: Path, b: Path) -> bool:
    """Two split manifests that put every file in the same class and split. A run trained on
    a re-encoded copy of the same files (scripts/compact_copy.py, for a lent GPU) differs from
    the study's manifest only in the files' content hashes: it is the same split."""
    try:
        return D.read_manifest(a) == D.read_manifest(b)
    except (OSError, ValueError):
        return False


def _check_compatible(run: Path, split_file: Path, split_sha1: str, size: int, model: str,
                      seed: int, epochs: int):
    """A finished run from other settings would make the comparison meaningless."""
    from .models import get_spec
    meta = ModelFile.load(run / "model.json")
    problems = []
    if meta.train_args.get("seed") not in (None, seed):
        problems.append(f"it was trained with seed {meta.train_args['seed']}, the study's is {seed}")
    if len(meta.history or []) > epochs:
        problems.append(f"it trained {len(meta.history)} epochs, over this study's cap of {epochs}")
    recipe = get_spec(model).defaults
    for key in ("schedule", "lr", "optimizer"):
        was = meta.train_args.get(key)
        if key in recipe and was is not None and was != recipe[key]:
            problems.append(f"its {key} was {was}, the recipe's is now {recipe[key]}")
    if (meta.split_manifest_sha1 and meta.split_manifest_sha1 != split_sha1
            and not _same_assignment(run / "split.csv", split_file)):
        problems.append("it was trained on a different split")
    if meta.image_size != size:
        problems.append(f"its image size is {meta.image_size}, the study's {size}")
    if problems:
        raise ValueError(f"{run}: finished run does not match this study ({'; '.join(problems)}); "
                         "use another --out or delete that run folder")


def train_generation(cfg: StudyConfig, model: str, split_file: Path, split_sha1: str) -> dict:
    from .train import TrainConfig, train
    run = Path(cfg.out) / "runs" / model
    size = image_size_for(cfg, model)
    if run_finished(run, epochs_for(cfg, model)):
        _check_compatible(run, split_file, split_sha1, size, model, cfg.seed, epochs_for(cfg, model))
        log.info("study: %s already trained (%s): skipping", model, run)
        return {"status": "skipped (finished earlier)", "finished": True}
    if run_finished(run):  # stopped by a lower cap: continue under the same settings
        _check_compatible(run, split_file, split_sha1, size, model, cfg.seed, epochs_for(cfg, model))
    resume = (run / "checkpoint" / "last.json").exists()
    log.info("study: %s %s (%d epochs max, %d px)", "resuming" if resume else "training",
             model, epochs_for(cfg, model), size)
    t0 = time.perf_counter()
    s = train(TrainConfig(model=model, data=cfg.data, out=str(run), epochs=epochs_for(cfg, model),
                          image_size=size, seed=cfg.seed, split_seed=cfg.seed,
                          split_file=str(split_file), fractions=cfg.fractions,
                          precision=cfg.precision, cache_dir=cfg.cache_dir, resume=resume,
                          max_steps_per_epoch=cfg.max_steps_per_epoch, progress=cfg.progress))
    return {"status": "resumed" if resume else "trained", "finished": bool(s["finished"]),
            "wall_s": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- evaluate

def evaluate_generation(cfg: StudyConfig, model_name: str, imgs: _Images, split_sha1: str) -> dict:
    """Metrics on train/val/test -> runs/<model>/study_eval.json (+ test_predictions.csv).
    Reused while the weights and the split are unchanged."""
    import torch

    from .evaluate import compute_metrics, write_predictions
    from .models import load_model
    from .runtime import TorchRunner, batched_logits, softmax
    from .train import choose_device_precision
    run = Path(cfg.out) / "runs" / model_name
    ev_path = run / "study_eval.json"
    stamp = {"version": EVAL_VERSION, "split_sha1": split_sha1,
             "weights_mtime_ns": (run / "model.safetensors").stat().st_mtime_ns}
    if ev_path.exists() and (run / "test_predictions.csv").exists():
        old = json.loads(ev_path.read_text())
        if all(old.get(k) == v for k, v in stamp.items()):
            return old
    model, meta = load_model(run)
    device, precision = choose_device_precision(cfg.precision)
    runner = TorchRunner(model.to(device).to(memory_format=torch.channels_last), meta.image_size,
                         device, precision)
    ds, images, splits, _ = imgs.get(meta.image_size)
    if list(meta.classes) != ds.classes:
        raise ValueError(f"{run}: model classes {meta.classes} differ from the data's {ds.classes}")
    result = {**stamp, "model": model_name, "image_size": meta.image_size, "splits": {}}
    t0 = time.perf_counter()
    for split in D.SPLITS:
        idx = np.flatnonzero(splits == split)
        probs = softmax(batched_logits(runner, images, idx))
        y = ds.labels[idx]
        result["splits"][split] = compute_metrics(y, probs, ds.classes)
        if split == "test":
            write_predictions(run / "test_predictions.csv", [ds.samples[i].path for i in idx],
                              [ds.classes[i] for i in y], probs, ds.classes)
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    D.atomic_write_json(ev_path, result)
    acc = {s: round(m["accuracy"], 4) for s, m in result["splits"].items()}
    log.info("study: %s accuracy %s", model_name, acc)
    return result


# ----------------------------------------------------------------------------- the study

def run_study(cfg: StudyConfig) -> dict:
    from .models import library_versions
    from .report import write_report
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    split_file, _, data_summary = prepare_split(cfg, out)
    study_path = out / "study.json"
    previous = json.loads(study_path.read_text()) if study_path.exists() else {}
    state = {
        "command": cfg.command, "config": {**asdict(cfg), "epochs_per_model": {
            m: epochs_for(cfg, m) for m in cfg.models}, "image_size_per_model": {
            m: image_size_for(cfg, m) for m in cfg.models}},
        "data": data_summary, "library_versions": library_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": previous.get("runs", {}), "finished": False,
    }
    D.atomic_write_json(study_path, state)
    for model in cfg.models:
        info = train_generation(cfg, model, split_file, data_summary["split_sha1"])
        prev = state["runs"].get(model, {})
        # a record of an attempt that never finished (killed, or its folder replaced since) says
        # nothing about the finished run now in its place
        if info["status"].startswith("skipped") and prev.get("finished"):
            first = prev.get("status", "trained").split(",")[0]  # trained / resumed, once
            info = {**prev, "status": first + ", skipped on re-run"}
        state["runs"][model] = info
        D.atomic_write_json(study_path, state)
        if not info["finished"]:
            log.warning("study stopped during %s; run the same command again to continue", model)
            return state
    imgs = _Images(cfg, split_file)
    for model in cfg.models:
        evaluate_generation(cfg, model, imgs, data_summary["split_sha1"])
    state["finished"] = True
    state["wall_s_this_invocation"] = round(time.perf_counter() - t_start, 1)
    D.atomic_write_json(study_path, state)
    write_report(out, screen_report=cfg.screen_report)
    if cfg.public:
        write_report(out, target=Path(cfg.public), public=True, screen_report=cfg.screen_report)
    return state


def track_study(tracker, state: dict, out: Path) -> None:
    """A study into an experiment tracker: its settings, each generation's learning curve
    and split accuracies (metrics ``<model>.<name>``), study.json, the report and figures."""
    if not tracker.active:
        return
    tracker.params(state["config"])
    for model in state["runs"]:
        run = out / "runs" / model
        for rec in (json.loads(x) for x in _read_lines(run / "history.jsonl")):
            tracker.metrics({f"{model}.{k}": v for k, v in rec.items() if k != "epoch"}, step=rec["epoch"])
        ev = run / "study_eval.json"
        if ev.exists():
            splits = json.loads(ev.read_text())["splits"]
            tracker.metrics({f"{model}.{s}_{k}": m[k] for s, m in splits.items()
                             for k in ("accuracy", "macro_f1")})
    tracker.artifacts([out / "study.json", out / "report.md", out / "figures"])


def _read_lines(p: Path) -> list[str]:
    return p.read_text().splitlines() if p.exists() else []
