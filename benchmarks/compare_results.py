"""Two `bloodcell predict --out X.csv` results files of the same images, compared: whether
they are byte-identical, how many classes, review flags and multi-cell flags differ, and
how many of each are right when the parent folder is the true class (a class-folder
dataset such as ../shared/data/pbc).

    python benchmarks/compare_results.py A.csv B.csv

For example, the same command before and after a code change:
    git worktree add /tmp/old 46edcf8
    PYTHONPATH=/tmp/old/src python -m bloodcell predict ../shared/data/pbc --out old.csv
    python -m bloodcell predict ../shared/data/pbc --backend onnx --out new.csv
    python benchmarks/compare_results.py old.csv new.csv
"""
import argparse
import csv
import sys
from pathlib import Path


def rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    a, b = rows(args.a), rows(args.b)
    if set(a) != set(b):
        sys.exit(f"different images: {len(set(a) ^ set(b))} paths in only one of the files")
    same_bytes = args.a.read_bytes() == args.b.read_bytes()
    ok = [p for p in a if a[p]["status"] == "ok" and b[p]["status"] == "ok"]

    def differ(col):
        return sum(a[p].get(col) != b[p].get(col) for p in ok)

    def right(r):
        return sum(r[p]["class"] == Path(p).parent.name for p in ok)

    print(f"{len(a)} images, {len(ok)} classified in both; byte-identical files: {same_bytes}")
    print("| | differ |\n|---|---:|")
    for col in ("class", "needs_review", "multi_cell", "multi_cell_score", "probability"):
        print(f"| {col} | {differ(col)} |")
    print(f"\nright (class = parent folder): {args.a.name} {right(a)}, {args.b.name} {right(b)}; "
          f"needs review: {sum(a[p]['needs_review'] == 'True' for p in ok)} vs "
          f"{sum(b[p]['needs_review'] == 'True' for p in ok)}")


if __name__ == "__main__":
    main()
