"""Argument helpers shared by the sub-commands."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from pathlib import Path

from ..data import default_data_dir
from ..trainconfig import in_range, range_text


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


def check_out(out, folder: bool, option: str = "--out") -> None:
    """Fail before the work, not after it: ``out`` (a folder when ``folder``, else a file)
    must be creatable or replaceable. Creates nothing."""
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out}: exists and is not a folder")
    if not folder and out.is_dir():
        raise ValueError(f"{option} {out}: is a folder; give a file name")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{option} {out}: not writable")
    parent = out.parent.absolute()
    while not parent.exists():  # the folders still to make go into the nearest existing one
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {out}: {parent} is not a folder")
    if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {out}: its folder {parent} is not writable")


def fallback_arg(value: str):
    """--other-labs-model: "auto" (any case) is "auto", "none" None, anything else a model path."""
    return {"none": None, "auto": "auto"}.get(value.lower(), value)


def add_answer_options(p: argparse.ArgumentParser) -> None:
    """The options predict and serve share about who answers and what is flagged:
    ``--review-views`` and ``--other-labs-model`` (parsed: "auto", None or a path)."""
    from ..predict import REVIEW_VIEWS
    p.add_argument("--review-views", type=int, choices=REVIEW_VIEWS, default=1,
                   help="4: the review flag also looks at the image flipped both ways and turned "
                        "180 degrees (an image any view is unsure of is flagged; the answer stays the "
                        "first view's): fewer errors left unflagged, up to 4x the model's time")
    p.add_argument("--other-labs-model", type=fallback_arg, default="auto", metavar="auto|none|MODEL",
                   help="model for images whose colours the main model calls unlike its training images "
                        "(another lab's stain or scanner): auto (default: the bundled other-labs model, "
                        "with the bundled model), none, or a run folder / model file")


def ranged(kind, lo, hi=None, lo_open=False):
    """argparse type: a finite number in lo..hi (over lo with lo_open); errors name the value."""
    want = range_text(lo, hi, lo_open)

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (must be {want})") from None
        if not in_range(v, lo, hi, lo_open):
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {want})")
        return v
    return parse


def add_options(parser: argparse.ArgumentParser, config_cls) -> None:
    """One option per field of the dataclass ``config_cls`` (``--field-name``), typed from
    the annotation and described by the field's metadata (see ``trainconfig.option``):
    a bool that defaults to True becomes ``--no-...``, another bool a switch; a field
    without a default is required unless its metadata says otherwise."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        kw = {"dest": f.name, "default": default,
              "help": argparse.SUPPRESS if meta.get("hidden") else meta.get("help")}
        if kind is bool:
            kw["action"] = "store_false" if default is True else "store_true"
        else:
            kw["type"] = ranged(kind, *meta["range"]) if "range" in meta else kind
            if "choices" in meta:
                kw["choices"] = meta["choices"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw["required"] = meta.get("required", True)
        parser.add_argument(meta.get("flag") or "--" + f.name.replace("_", "-"), **kw)


def options_to_config(config_cls, args: argparse.Namespace, **overrides):
    """The dataclass from parsed options (those ``add_options`` made), ``overrides`` on top."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
              if hasattr(args, f.name)}
    return config_cls(**{**values, **overrides})
