"""Argument helpers shared by the sub-commands."""
from __future__ import annotations

import argparse
import math
import sys

from ..data import default_data_dir


def data_or_default(path):
    if path:
        return path
    d = default_data_dir()
    if d is None:
        sys.exit("no --data given and ../shared/data/pbc not found. Get the PBC dataset "
                 "(Acevedo et al. 2020, CC BY 4.0) from Mendeley Data "
                 "https://data.mendeley.com/datasets/snkd93bnjr/1 or run `bloodcell fetch-data`, "
                 "then pass --data DIR (a folder of class sub-folders).")
    return str(d)


def ranged(kind, lo, hi=None, lo_open=False):
    """argparse type: a finite number in lo..hi (over lo with lo_open); errors name the value."""
    want = (f"over {lo:g}" if lo_open else f"{lo:g} or more") if hi is None else (
        f"over {lo:g} and at most {hi:g}" if lo_open else f"{lo:g} to {hi:g}")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (must be {want})") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {want})")
        return v
    return parse
