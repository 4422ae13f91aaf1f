"""``bloodcell study`` and ``report``: the model study and its report."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..data import DEFAULT_SEED
from ..study import (STUDY_MODELS, StudyConfig, parse_epochs_cap, parse_image_size, parse_models, run_study,
                     track_study)
from ..tracking import MLFLOW_HELP, Tracker
from .args import data_or_default


def _command_line(args) -> str:
    """The command as typed when run from the console script, else rebuilt from the options."""
    if os.path.basename(sys.argv[0]) == "bloodcell" and "study" in sys.argv[1:]:
        argv = sys.argv[1:]
    else:
        argv = ["study", "--data", args.data or "", "--out", args.out]
        for opt in ("models", "image_size", "epochs_cap", "seed", "precision", "public",
                    "screen_report", "max_steps_per_epoch"):
            v = getattr(args, opt)
            if v is not None:
                argv += [f"--{opt.replace('_', '-')}", str(v)]
    return " ".join(shlex.quote(a) for a in ["bloodcell"] + argv)


def cmd_study(args):
    models = parse_models(args.models)
    cfg = StudyConfig(
        data=data_or_default(args.data), out=args.out, models=models,
        image_size=parse_image_size(args.image_size) or None,
        epochs_cap=parse_epochs_cap(args.epochs_cap), seed=args.seed, precision=args.precision,
        cache_dir=args.cache_dir, max_steps_per_epoch=args.max_steps_per_epoch,
        progress=not args.no_progress, public=args.public, screen_report=args.screen_report,
        command=_command_line(args))
    with Tracker.start("study", run_name=Path(args.out).name, enabled=args.mlflow) as tracker:
        state = run_study(cfg)
        track_study(tracker, state, Path(args.out))
    if state.get("finished"):
        print(f"study done: {Path(args.out) / 'report.html'} and report.md")
        if args.public:
            print(f"public copy (no dataset images): {Path(args.public) / 'report.md'}")
    else:
        return 3


def _add_study(sub):
    p = sub.add_parser("study", help="train and evaluate the six generations, write the report",
                       description="Train the study's generations on one shared split, evaluate "
                       "each on train/val/test and write REPORT_DIR/report.md + report.html. "
                       "Re-run the same command to continue an interrupted study.")
    p.add_argument("--data", help="dataset folder of class sub-folders (default: ../shared/data/pbc)")
    p.add_argument("--out", required=True, help="report folder (REPORT_DIR)")
    p.add_argument("--models", help=f"comma-separated (default: {','.join(STUDY_MODELS)})")
    p.add_argument("--image-size",
                   help="input size: N for every generation, or e.g. '128,lite0-finetune=160' "
                   "(default: each model's, 224)")
    p.add_argument("--epochs-cap", help="max epochs: N for all, or e.g. '20,lite0-finetune=6' "
                   "(early stopping, patience 3, still applies)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split and training seed")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--cache-dir", help="decoded-image cache (default $BLOODCELL_CACHE or ~/.cache/bloodcell)")
    p.add_argument("--public", metavar="DIR",
                   help="also write a copy without dataset images for committing (e.g. docs/study)")
    p.add_argument("--screen-report", help="screen_report.md to include (default REPORT_DIR/screen/)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mlflow", action="store_true", help=MLFLOW_HELP)
    p.add_argument("--max-steps-per-epoch", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_study)


def cmd_report(args):
    from ..report import write_report  # matplotlib, scikit-learn: not on other commands' start-up
    p = write_report(args.study, target=args.out, public=args.public,
                     screen_report=args.screen_report, compare=args.compare, notes=args.notes)
    print(f"wrote {p} and {p.with_suffix('.html')}")


def _add_report(sub):
    p = sub.add_parser("report", help="(re)write the report of a finished `bloodcell study`",
                       description="Rebuild report.md/report.html and figures from a study folder "
                       "without training anything.")
    p.add_argument("--study", required=True, help="the study's REPORT_DIR")
    p.add_argument("--out", help="where to write (default: the study folder)")
    p.add_argument("--public", action="store_true",
                   help="leave out every figure showing dataset images (for committing, e.g. to docs/study)")
    p.add_argument("--screen-report", help="screen_report.md to include (default REPORT_DIR/screen/)")
    p.add_argument("--compare", metavar="FOLDER",
                   help="another study's report folder (its summary.json) to set beside this run, "
                   "e.g. docs/study-capped")
    p.add_argument("--notes", metavar="FILE",
                   help="Markdown added after the discussion: how the run was made and what was "
                   "measured about it (default REPORT_DIR/notes.md when it exists)")
    p.set_defaults(func=cmd_report)


def add_commands(sub):
    _add_study(sub)
    _add_report(sub)
