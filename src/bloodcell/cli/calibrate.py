"""``bloodcell calibrate``: temperature, review threshold and input check, stored in model.json."""
from __future__ import annotations

from ..calibrate import DEFAULT_TARGET_ACCURACY, calibrate, format_report
from ..runtime import BACKENDS
from .args import check_out, data_or_default, ranged


def cmd_calibrate(args):
    if args.out:
        check_out(args.out, folder=False)
    r = calibrate(args.model, data_or_default(args.data), out=args.out, split_file=args.split_file,
                  cache_dir=args.cache_dir, target=args.target, progress=not args.no_progress,
                  store=not args.dry_run, backend=args.backend)
    print(format_report(r))
    if r.get("stored_in"):
        print(f"stored temperature, review_threshold and input_check in {r['stored_in']}")
    if args.out:
        print(f"wrote {args.out}")


def add_commands(sub):
    p = sub.add_parser("calibrate", help="fit temperature + review threshold on val; store in model.json")
    p.add_argument("--model", required=True, help="run folder or model file")
    p.add_argument("--data", help="dataset folder (default: ../shared/data/pbc)")
    p.add_argument("--split-file", help="split manifest (default: the run's split.csv)")
    p.add_argument("--out", help="report JSON file")
    p.add_argument("--target", type=ranged(float, 0, 1, lo_open=True), default=DEFAULT_TARGET_ACCURACY,
                   help="accuracy wanted on the images not flagged for review (default 0.995)")
    p.add_argument("--cache-dir")
    p.add_argument("--backend", choices=BACKENDS, default="onnx")
    p.add_argument("--dry-run", action="store_true", help="report only; leave model.json unchanged")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_calibrate)
