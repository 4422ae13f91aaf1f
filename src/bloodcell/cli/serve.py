"""``bloodcell serve`` (the lab page and its HTTP API) and ``bloodcell backup``."""
from __future__ import annotations

import logging
import sqlite3

from ..runtime import BACKENDS
from ..serve import AUTO, ServeConfig, default_db_path, serve
from ..serve.store import backup
from .args import add_answer_options, ranged

log = logging.getLogger("bloodcell")


def cmd_serve(args):
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can see and change "
                    "the data (there is no login)", args.host)
    screen = None if args.no_screen else (args.screen or AUTO)
    serve(ServeConfig(model=args.model, db_path=args.db, host=args.host, port=args.port,
                      max_upload_mb=args.max_upload_mb, threads=args.threads, log_level=args.log_level,
                      screen=screen, backend=args.backend, allowed_hosts=tuple(args.allow_host),
                      other_labs_model=args.other_labs_model, review_views=args.review_views))


def cmd_backup(args):
    db = args.db or default_db_path()
    try:
        n = backup(db, args.out)
    except sqlite3.Error as e:
        raise OSError(f"cannot back up {db}: {e}") from None
    print(f"backed up {db} to {args.out}: {n['samples']} sample(s), {n['cells']} cell(s), "
          f"{n['corrections']} correction(s); integrity check ok")


def add_commands(sub):
    p = sub.add_parser("serve", help="local review page and HTTP API (http://127.0.0.1:8000/)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=ranged(int, 1, 65535), default=8000, help="TCP port, 1-65535 (default 8000)")
    p.add_argument("--model", help="run folder or model file (default: the bundled model)")
    p.add_argument("--db", help=f"SQLite database (default {default_db_path()}, or $BLOODCELL_DB)")
    p.add_argument("--max-upload-mb", type=ranged(float, 0, lo_open=True), default=20,
                   help="per-file upload limit (default 20)")
    p.add_argument("--threads", type=ranged(int, 1, 4),
                   help="inference threads (default: onnx every core, torch half the cores; 1 to 4)")
    p.add_argument("--screen", help="multi-cell screen file (default: the bundled one, if any)")
    p.add_argument("--no-screen", action="store_true", help="no multi-cell flag")
    add_answer_options(p)
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="inference engine (default auto: the model's int8 file where this CPU runs "
                        "it exactly, else onnx; saliency always uses torch)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (info logs every request)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this host name (repeatable; loopback and --host always are): "
                        "requests naming any other host are refused")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("backup", help="copy the lab database, also while `bloodcell serve` runs")
    p.add_argument("--db", help=f"SQLite database (default {default_db_path()}, or $BLOODCELL_DB)")
    p.add_argument("--out", required=True, help="the copy (one self-contained SQLite file)")
    p.set_defaults(func=cmd_backup)
