"""``bloodcell train``, ``evaluate`` and ``models``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data import DEFAULT_SEED
from ..evaluate import evaluate, print_report, track
from ..predict import BACKENDS
from ..tracking import MLFLOW_HELP, Tracker
from .args import data_or_default

# models and train import torch: loaded by their commands only, so that building the
# parser (every command, `bloodcell predict` on ONNX Runtime too) does not


def _add_train_args(p, model_required=True):
    p.add_argument("--model", required=model_required, help="architecture name (see `bloodcell models`)")
    p.add_argument("--data", help="dataset folder of class sub-folders (default: ../shared/data/pbc)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, model files)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", type=int)
    p.add_argument("--patience", type=int, help="early stopping patience on val accuracy (0 = off)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--schedule", choices=["constant", "onecycle"])
    p.add_argument("--optimizer", choices=["adam", "adamw"])
    p.add_argument("--ema", type=float, help="keep an exponential moving average of the weights "
                   "with this decay per step (e.g. 0.998) and validate/save it; 0 = off")
    p.add_argument("--subclass-aux", type=float, help="weight of an auxiliary loss on file-name "
                   "sub-types (PBC: BNE/SNE neutrophils, PMY/MY/MMY ig), training only; 0 = off")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--split-seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--split-file", help="reuse a split manifest (split.csv of another run)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--weights", help="local pretrained weights file (resnet50, or other Lite0 weights)")
    p.add_argument("--no-pretrained", action="store_true", help="random init (for comparisons)")
    p.add_argument("--cache-dir", help="decoded-image cache (default ~/.cache/bloodcell)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--max-steps-per-epoch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mlflow", action="store_true", help=MLFLOW_HELP)


def cmd_train(args):
    from ..train import TrainConfig, train
    pretrained = False if args.no_pretrained else (args.weights or True)
    if args.model == "resnet50" and not args.weights:
        pretrained = False if args.no_pretrained else True
    cfg = TrainConfig(
        model=args.model, data=data_or_default(args.data), out=args.out, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, image_size=args.image_size, patience=args.patience,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, schedule=args.schedule,
        optimizer=args.optimizer, ema=args.ema, subclass_aux=args.subclass_aux, seed=args.seed,
        split_seed=args.split_seed,
        split_file=args.split_file, precision=args.precision, pretrained=pretrained,
        cache_dir=args.cache_dir, resume=args.resume,
        max_steps_per_epoch=args.max_steps_per_epoch, progress=not args.no_progress)
    print("settings:", json.dumps({k: v for k, v in vars(cfg.resolved()).items() if k != "extra"}))
    with Tracker.start("train", run_name=Path(args.out).name, enabled=args.mlflow) as tracker:
        s = train(cfg, tracker=tracker)
    print(f"best val accuracy {s['best']['val_accuracy']:.4f} at epoch {s['best']['epoch']}; "
          f"model in {s['run']}/model.safetensors + model.json")


def cmd_evaluate(args):
    name = f"evaluate {Path(args.model).name if args.model else 'bundled'} {args.split}"
    with Tracker.start("evaluate", run_name=name, enabled=args.mlflow) as tracker:
        m = evaluate(args.model, data_or_default(args.data), split=args.split, out=args.out,
                     split_file=args.split_file, batch_size=args.batch_size, cache_dir=args.cache_dir,
                     progress=not args.no_progress, backend=args.backend)
        track(tracker, m, args.out)
    print_report(m)
    if args.out:
        print(f"wrote {args.out}/metrics.json and predictions.csv")


def cmd_models(args):
    from ..models import REGISTRY
    for name, spec in REGISTRY.items():
        gen = f"gen {spec.generation}" if spec.generation else "      "
        print(f"{name:<16}{gen}  {spec.description}")


def add_commands(sub):
    p = sub.add_parser("train", help="train a model on a dataset folder")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved model on a split")
    p.add_argument("--model", help="run folder or model file (default: the bundled model)")
    p.add_argument("--data")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--split-file")
    p.add_argument("--out", help="folder for metrics.json and predictions.csv")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="inference engine (default torch; onnx-int8 needs `bloodcell export --format onnx-int8`)")
    p.add_argument("--cache-dir")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mlflow", action="store_true", help=MLFLOW_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(func=cmd_models)
