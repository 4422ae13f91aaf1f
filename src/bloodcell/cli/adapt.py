"""``bloodcell adapt``: a model adapted to another lab from a handful of labelled cells."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from .args import check_out, ranged


def cmd_adapt(args):
    # torch is imported by the command only: `bloodcell predict` on ONNX Runtime stays torch-free
    from ..adapt import AdaptSettings, adapt, load_folder, load_reviewed, save_adapted
    from ..predict import Classifier
    out = Path(args.out)
    check_out(out, folder=True)  # minutes of fitting must not end in "permission denied"
    if (out / "model.json").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a model; choose another --out or pass --overwrite")
    base = Classifier.load(args.model, screen=None, fallback=None)
    if args.data:
        cells = load_folder(args.data, base.classes, base.image_size, base.framing)
    else:
        cells = load_reviewed(args.db, base.classes, base.image_size, base.framing, sample=args.sample)
    settings = AdaptSettings(**{f.name: getattr(args, f.name) for f in fields(AdaptSettings)
                                if getattr(args, f.name, None) is not None})
    counts = ", ".join(f"{c} {n}" for c, n in cells.class_counts().items())
    print(f"adapting {args.model or 'the bundled model'} to {len(cells.labels)} labelled cells ({counts}) "
          f"from {cells.source}" + (f"; skipped {len(cells.skipped)}" if cells.skipped else ""))
    a = adapt(args.model, cells, settings)
    save_adapted(a, out)
    cf = a.report.get("cross_fitted")
    if cf:
        kept = cf["fitted_temperature"] < a.meta.temperature
        print(f"cross-validated accuracy on the labelled cells ({cf['folds']} folds): {cf['accuracy']:.3f}; "
              + (f"temperature {a.meta.temperature:.3f} (the base model's: the {cf['fitted_temperature']:.3f} "
                 "fitted on those out-of-fold logits would be more confident)" if kept else
                 f"temperature {a.meta.temperature:.3f} fitted on those out-of-fold logits"))
    ic = a.meta.input_check
    print(f"input check refitted on the new lab's cells: threshold {ic['threshold']:.2f}, "
          f"images from {ic['min_side']} px up are not 'small'")
    print(f"adapted in {a.report['seconds']:.0f} s ({a.report['cpu_seconds']:.0f} s CPU); "
          f"model in {out}/model.safetensors + model.json "
          f"(use --model {out} with predict, evaluate, serve)")


def add_commands(sub):
    p = sub.add_parser("adapt", help="fine-tune a model to another lab from a handful of labelled cells")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder of class sub-folders (any letter case, any subset of the "
                     "classes), 5-20 images each")
    src.add_argument("--db", help="the lab page's database: its reviewed cells are the labelled cells")
    p.add_argument("--sample", help="with --db: only this sample's reviewed cells")
    p.add_argument("--out", required=True, help="run folder for the adapted model")
    p.add_argument("--model", help="base model: run folder or model file (default: the bundled model)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    # defaults: bloodcell.adapt.AdaptSettings (not imported here: it needs torch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["head", "full"], help="full (the default): fine-tune the network "
                   "on freshly augmented cells (minutes); head: fit the top on cached features (seconds, "
                   "less accurate)")
    p.add_argument("--steps", type=ranged(int, 1), help="optimiser steps (default: head 300, full 40)")
    p.add_argument("--lr", type=ranged(float, 0, lo_open=True),
                   help="peak learning rate (default: head 1e-2, full 1e-3)")
    p.add_argument("--l2sp", type=ranged(float, 0), help="pull towards the base weights "
                   "(default: head 0.3, full 0.01)")
    p.add_argument("--augment", choices=["model", "domain", "turns", "none"], help="full mode's "
                   "augmentation: the model's own, bloodcell.augment.DomainAugment, or flips + 90-degree "
                   "turns + stain/colour jitter (default turns)")
    p.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=None, help="full mode: "
                   "the package's example cells (PBC, two per class) of the classes you did not label join "
                   "every step, so the model does not unlearn them (default: on in full mode)")
    p.add_argument("--anchor-style", action=argparse.BooleanOptionalAction, default=None, help="full mode: "
                   "show the anchors in your cells' zoom and colours (default: on in full mode)")
    p.add_argument("--views", type=ranged(int, 1), help="head mode: augmented views per cell (default 8)")
    p.add_argument("--folds", type=ranged(int, 0), help="cross-fitting folds for the temperature "
                   "(default: full 2, head 3; 0 keeps the base model's temperature)")
    p.add_argument("--adabn", type=ranged(float, 0, 1), help="share of the new lab's BatchNorm "
                   "statistics (default 0)")
    p.add_argument("--train-from", type=ranged(int, 0), help="first trained block of an EfficientNet-Lite0 "
                   "(default: head 17 = the head only, full 0 = every layer)")
    p.set_defaults(func=cmd_adapt)
