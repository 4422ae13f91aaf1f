"""``bloodcell train``, ``evaluate`` and ``models``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..evaluate import evaluate, print_report, track
from ..runtime import BACKENDS
from ..tracking import MLFLOW_HELP, Tracker
from ..trainconfig import TrainConfig
from .args import add_options, check_out, data_or_default, options_to_config

# models and train import torch: loaded by their commands only, so that building the
# parser (every command, `bloodcell predict` on ONNX Runtime too) does not; TrainConfig
# (trainconfig.py) is torch-free for that reason


def _add_train_args(p):
    """TrainConfig's fields (trainconfig.py holds their help), then the options that
    are not one field each."""
    add_options(p, TrainConfig)
    p.add_argument("--weights", help="local pretrained weights file (resnet50, or other Lite0 weights)")
    p.add_argument("--no-pretrained", action="store_true", help="random init (for comparisons)")
    p.add_argument("--mlflow", action="store_true", help=MLFLOW_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="train a new run in an --out that already holds one (without: refused)")


def cmd_train(args):
    from ..train import train
    pretrained = False if args.no_pretrained else (args.weights or True)
    cfg = options_to_config(TrainConfig, args, data=data_or_default(args.data), pretrained=pretrained).check()
    check_out(args.out, folder=True)
    out = Path(args.out)
    if not (args.resume or args.overwrite) and any((out / f).exists() for f in ("model.json", "checkpoint")):
        raise ValueError(f"--out {out} already holds a run: pass --resume to continue it, --overwrite to "
                         "train a new one there (its files are replaced), or choose another --out")
    print("settings:", json.dumps({k: v for k, v in vars(cfg.resolved()).items() if k != "extra"}))
    with Tracker.start("train", run_name=out.name, enabled=args.mlflow) as tracker:
        s = train(cfg, tracker=tracker)
    if not s.get("finished"):  # a script's `train && calibrate` must not go on with it
        print(f"interrupted after epoch {len(s['history'])} of {cfg.resolved().epochs}: the last completed "
              f"epoch is checkpointed; run the same command with --resume to continue", file=sys.stderr)
        return 3
    print(f"best val accuracy {s['best']['val_accuracy']:.4f} at epoch {s['best']['epoch']}; "
          f"model in {s['run']}/model.safetensors + model.json")


def cmd_evaluate(args):
    if args.out:
        check_out(args.out, folder=True)
    name = f"evaluate {Path(args.model).name if args.model else 'bundled'} {args.split}"
    with Tracker.start("evaluate", run_name=name, enabled=args.mlflow) as tracker:
        m = evaluate(args.model, data_or_default(args.data), split=args.split, out=args.out,
                     split_file=args.split_file, batch_size=args.batch_size, cache_dir=args.cache_dir,
                     progress=not args.no_progress, backend=args.backend).metrics
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
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="which images (default test; all: every image, no split needed)")
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
