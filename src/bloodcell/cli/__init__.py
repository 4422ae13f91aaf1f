"""``bloodcell`` command line: a thin layer over the Python API.

The top layer. Each module here adds its sub-commands through ``add_commands(subparsers)``; each
sub-command is a function ``cmd_<name>(args)``. Library modules never import this
package (tests/test_layers.py checks it; docs/architecture.md has the layer order).
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys

from .. import __version__
from . import adapt, calibrate, data, export, predict, screen, serve, study, train

log = logging.getLogger("bloodcell")

# in the order `bloodcell --help` lists them
COMMAND_MODULES = [predict, screen, train, calibrate, adapt, export, study, serve, data]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bloodcell", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"bloodcell {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true")
    # no abbreviations: `calibrate --split test` must not be read as --split-file test
    sub = ap.add_subparsers(dest="command", required=True,
                            parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False))
    for mod in COMMAND_MODULES:
        mod.add_commands(sub)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    try:
        return args.func(args) or 0
    except (OSError, ValueError) as e:  # bad paths, bad files, bad arguments: one clear line
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
