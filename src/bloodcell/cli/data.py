"""``bloodcell fetch-data``: download and unpack the PBC dataset."""
from __future__ import annotations

from ..fetch import PBC_URL, fetch_data


def cmd_fetch(args):
    s = fetch_data(args.out, url=args.url, sha256=args.sha256, archive=args.archive,
                   progress=not args.no_progress)
    print(f"PBC data in {s['path']}: {s['n_images']} images "
          f"(sha256 {s['sha256']}{', verified' if s['verified'] else ', not verified: no --sha256 given'})")
    for c, n in s["class_counts"].items():
        print(f"  {c:<14}{n:>6}")
    for sk in s["skipped"]:
        print(f"  skipped {sk['path']}: {sk['reason']}")


def add_commands(sub):
    p = sub.add_parser("fetch-data", help="download and unpack the PBC dataset")
    p.add_argument("--out", default="data/pbc", help="target folder (default data/pbc)")
    p.add_argument("--url", default=PBC_URL)
    p.add_argument("--sha256", help="expected sha256 of the archive (checked when given)")
    p.add_argument("--archive", help="use an already downloaded archive instead")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_fetch)
