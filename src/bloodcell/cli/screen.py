"""``bloodcell screen`` and ``screen-fit``: the multi-cell screen on its own."""
from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

from ..batch import expand_inputs
from ..data import atomic_write_text
from ..screen import DEFAULT_IMAGE_SIZE, Screen
from .args import check_out, data_or_default, ranged


def cmd_screen(args):
    scr = Screen.load(args.screen)
    items = expand_inputs(args.paths)  # as predict lists them: odd files named with a reason
    if not items:
        raise ValueError("no image files given")
    paths = [Path(p) for p, why in items if why is None]
    scored = iter(scr.score_paths(paths) if paths else [])
    recs = [next(scored) if why is None else {"path": p, "status": f"skipped: {why}"} for p, why in items]
    if args.debug_dir:
        for r in recs:
            if r["status"] == "ok":
                p = Path(r["path"])
                scr.debug_image(p, Path(args.debug_dir) / f"{p.stem}.screen.png")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "status", "score", "n_regions", "multi_cell"])
    for r in recs:
        w.writerow([r["path"], r["status"], r.get("score", ""), r.get("n_regions", ""),
                    r.get("multi_cell", "")])
    if args.out:
        atomic_write_text(Path(args.out), buf.getvalue())
    else:
        print(buf.getvalue(), end="")
    ok = [r for r in recs if r["status"] == "ok"]
    skipped = [r for r in recs if r["status"] != "ok"]
    flagged = sum(r["multi_cell"] for r in ok)
    print(f"{len(ok)} image(s) screened, {flagged} flagged multi-cell"
          + (f", {len(skipped)} skipped" if skipped else "")
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    for r in skipped:
        print(f"  {r['path']}: {r['status']}", file=sys.stderr)


def cmd_screen_fit(args):
    check_out(args.out, folder=False)
    scr = Screen.fit(data_or_default(args.data), image_size=args.image_size,
                     n_components=args.components, threshold=args.threshold,
                     cache_dir=args.cache_dir, progress=not args.no_progress)
    scr.save(args.out)
    print(f"screen fitted on {scr.info['n_images']} images; flags "
          f"{100 * scr.info['share_flagged']:.1f}% at threshold {scr.threshold}; wrote {args.out}")


def add_commands(sub):
    p = sub.add_parser("screen", help="flag images holding more than one white/nucleated cell")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--out", help="CSV file (default: print to stdout)")
    p.add_argument("--debug-dir", help="save a stain-mask/regions picture per image here")
    p.add_argument("--screen", help="screen model JSON (default: the bundled one)")
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("screen-fit", help="fit the multi-cell screen on a dataset folder (no labels)")
    p.add_argument("--data", help="dataset folder (default: ../shared/data/pbc)")
    p.add_argument("--out", required=True, help="screen model JSON to write")
    p.add_argument("--image-size", type=ranged(int, 16), default=DEFAULT_IMAGE_SIZE,
                   help=f"side the images are screened at (default {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--components", type=ranged(int, 1), default=3, help="Gaussian mixture components")
    p.add_argument("--threshold", type=ranged(float, -math.inf), default=0.0,
                   help="log-odds above which to flag (a finite number; default 0)")
    p.add_argument("--cache-dir", help="decoded-image cache (default ~/.cache/bloodcell)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_screen_fit)
