"""``bloodcell predict``: files, folders, globs -> CSV/JSON + the differential count."""
from __future__ import annotations

import sys

from ..batch import check_out_path, predict_paths
from ..predict import EXAMPLES_NOTE, Classifier, default_workers, example_files, examples_note
from ..decoding import DECODE_MODES, PROCESS_MIN_INPUTS
from ..modelfile import check_model_path
from ..runtime import BACKENDS
from .args import add_answer_options, ranged


def format_summary(s: dict) -> str:
    d = s["differential"]
    flagged = [f"{k} {what}" for k, what in ((d["n_multi_cell"], "multi-cell"),
                                             (d.get("n_input_warnings", 0), "with input warnings")) if k]
    note = "" if not flagged else (f" (incl. {', '.join(flagged)})" if d["flagged_included"] else
                                   f" ({', '.join(flagged)} left out; --include-flagged counts them)")
    wbc = d.get("white_cells")
    lines = [f"differential count over {d['n_counted']} image(s){note}:",
             f"  {'class':<14}{'count':>7}{'%':>8}   {'95% CI':<12}" + ("  % of white cells (95% CI)" if wbc else "")]
    for c, k in d["counts"].items():
        lo, hi = d["ci95_percent"][c]
        row = f"  {c:<14}{k:>7}{d['percent'][c]:>7.1f}%   {f'{lo:.1f}-{hi:.1f}%':<12}"
        if wbc and c in wbc["percent"]:
            wlo, whi = wbc["ci95_percent"][c]
            row += f"  {wbc['percent'][c]:5.1f}% ({wlo:.1f}-{whi:.1f}%)"
        elif wbc and c == "erythroblast" and wbc.get("nrbc_per_100_wbc") is not None:
            row += f"  {wbc['nrbc_per_100_wbc']:.1f} per 100 white cells (NRBC)"
        lines.append(row.rstrip())
    if wbc:
        lines.append(f"  white cells: {wbc['n_white']}"
                     + (f"; platelets ({wbc['n_platelet']}) are not part of the white-cell differential"
                        if wbc.get("n_platelet") is not None else ""))
    if s["n_ok"]:
        r = s["review"]
        routed_low = r.get("n_low_confidence_other_labs")
        low = (f"{r['n_low_confidence']} with confidence < {s['review_threshold']:.3g}" if routed_low is None else
               f"{r['n_low_confidence'] - routed_low} with confidence < {s['review_threshold']:.3g} (main model) "
               f"and {routed_low} < {s['other_labs_review_threshold']:.3g} (other-labs model)")
        lines.append(f"needs review: {r['n_needs_review']} of {s['n_ok']} classified "
                     f"({100.0 * r['n_needs_review'] / s['n_ok']:.1f}%): {low}, "
                     f"{r['n_input_warnings']} with input warnings")
    if s.get("n_other_labs"):
        lines.append(f"{s['n_other_labs']} image(s) with colours unlike the training images were classified "
                     f"by the other-labs model ({s['other_labs_model']}); they need review")
    lines.append(f"{s['n_inputs']} input(s): {s['n_ok']} classified, {s['n_skipped']} skipped"
                 + (f", {s['n_resumed']} taken from the interrupted run" if s["n_resumed"] else ""))
    how = (f"ray, {s['backend']}, batch {s['batch_size']}" if s.get("engine") == "ray" else
           f"{s['backend']}, batch {s['batch_size']}, {decoders(s)}")
    lines.append(f"{s['n_computed']} image(s) in {s['seconds']:.1f} s: {s['images_per_s']:.1f} images/s "
                 f"({how})")
    if s["skipped"]:
        lines.append(f"skipped {len(s['skipped'])} file(s):")
        lines += [f"  {k['path']}: {k['reason']}" for k in s["skipped"]]
    return "\n".join(lines)


_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {9: "\\t", 10: "\\n", 13: "\\r"}


def print_records(records: list[dict]) -> None:
    """One tab-separated line per input; control characters in file names are escaped
    so that a name cannot break the columns (the CSV output quotes them instead)."""
    for r in records:
        path = r["path"].translate(_CONTROL)
        if r["status"] != "ok":
            print(f"{path}\t{r['status']}")
            continue
        top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top3"])
        flags = ((["needs review"] if r["needs_review"] else []) + (["multi-cell"] if r.get("multi_cell") else [])
                 + (["other-labs model"] if r.get("model") == "other-labs" else []) + r.get("input_warnings", []))
        print(f"{path}\t{r['class']}\t{r['probability']:.3f}\t[{top}]"
              + (f"\t{'; '.join(flags)}" if flags else ""))


def decoders(summary: dict) -> str:
    """What decoded ahead of the model, in words: "2 decode processes", "1 decode thread"..."""
    n = summary["workers"]
    if n == 0:
        return "decoded inline"
    kind = "process" if summary.get("decode") == "processes" else "thread"
    return f"{n} decode {kind}{'es' if kind == 'process' and n > 1 else 's' if n > 1 else ''}"


def cmd_predict(args):
    check_out_path(args.out, parquet=args.engine == "ray")
    if args.onnx and args.backend not in ("onnx", "auto"):
        raise ValueError(f"--onnx {args.onnx} needs --backend onnx (not {args.backend})")
    if not args.paths and not args.examples:
        raise ValueError("nothing to classify: give image files, folders or globs, "
                         "or --examples for the example cells shipped with bloodcell")
    paths = args.paths + ([str(f) for f in example_files()] if args.examples else [])
    screen = None if args.no_screen else (args.screen or "auto")
    check_model_path(args.model, "--model")
    if args.other_labs_model not in ("auto", None):
        check_model_path(args.other_labs_model, "--other-labs-model")
    clf = Classifier.load(args.model, backend=args.backend, onnx_path=args.onnx, screen=screen,
                          review_threshold=args.review_threshold, threads=args.threads,
                          review_views=args.review_views,
                          fallback=args.other_labs_model)
    if args.engine == "ray":
        from ..ray_engine import ModelSpec, RayOptions, predict_ray
        if args.onnx or args.backend == "torch":
            raise ValueError("--engine ray runs the model's own ONNX file: use --backend auto, onnx or onnx-int8")
        # the actors run what --backend auto chose here (their CPUs are assumed alike)
        spec = ModelSpec(args.model, clf.backend, screen, args.review_threshold,
                         str(clf.onnx_path) if clf.backend == "onnx" else None,
                         args.other_labs_model, args.review_views)
        opts = RayOptions(args.address, args.actors, batch_size=args.batch_size)
        records, summary = predict_ray(clf, paths, spec, opts, out=args.out,
                                       include_flagged=args.include_flagged,
                                       progress=not args.no_progress)
    else:
        if args.out and args.out.lower().endswith(".parquet"):
            raise ValueError(f"--out {args.out}: Parquet is written by --engine ray; use .csv or .json")
        records, summary = predict_paths(clf, paths, out=args.out, batch_size=args.batch_size,
                                         workers=args.workers, include_flagged=args.include_flagged,
                                         progress=not args.no_progress, resume=not args.restart,
                                         decode=args.decode)
    if args.out is None or args.examples:  # the examples are few and meant to be looked at
        if len(records) <= 50:
            print_records(records)
        else:
            print(f"({len(records)} results not listed: pass --out results.csv or .json to keep them)")
    if summary["n_inputs"] == 0:
        print(f"no image files found in: {' '.join(args.paths)}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    if args.examples:
        print(examples_note(records))
    if args.out:
        print(f"wrote {args.out}")
    if summary["n_ok"] == 0:
        return 1


def add_commands(sub):
    p = sub.add_parser("predict", help="classify image files, folders (recursive) or globs")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--examples", action="store_true",
                   help=f"classify the {EXAMPLES_NOTE} shipped with bloodcell (no data needed)")
    p.add_argument("--model", help="run folder or model file (default: the bundled model)")
    p.add_argument("--out", help="results file: .csv (one row per image) or .json (with the summary)")
    p.add_argument("--batch-size", type=ranged(int, 1), default=64)
    p.add_argument("--workers", type=ranged(int, 0), default=None,
                   help=f"decode threads or processes (--decode) running ahead of the model "
                        f"(default {default_workers()}; 0 = decode inline)")
    p.add_argument("--decode", choices=DECODE_MODES, default="auto",
                   help="decode and screen ahead of the model in threads or worker processes "
                        f"(default auto: processes from {PROCESS_MIN_INPUTS} images on, when "
                        "there are 2 or more workers; they start in ~0.5 s and need no GIL)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default: the model's int8 file where this CPU runs it exactly, else "
                        "onnx), onnx (ONNX Runtime, float; exported once and cached next to the "
                        "model), onnx-int8 or torch")
    p.add_argument("--onnx", help="use this exported .onnx file (with --backend auto or onnx; it "
                                  "must take the model's input size)")
    p.add_argument("--threads", type=ranged(int, 1), help="model compute threads (default: all cores)")
    p.add_argument("--review-threshold", type=ranged(float, 0, 1),
                   help="flag images whose calibrated confidence is below this "
                        "(default: the model's calibrated value)")
    p.add_argument("--screen", help="multi-cell screen file (default: the bundled one, if any)")
    p.add_argument("--no-screen", action="store_true", help="do not run the multi-cell screen")
    add_answer_options(p)
    p.add_argument("--include-flagged", action="store_true",
                   help="count multi-cell images and images with input warnings in the "
                        "differential count too")
    p.add_argument("--restart", action="store_true", help="ignore the journal of an interrupted run")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (this process) or ray (Ray Data + an actor pool; pip install "
                        "'bloodcell[scale]'; --out may also be .parquet)")
    p.add_argument("--address", help="with --engine ray: the Ray cluster to join (host:port or "
                   "ray://host:10001; default RAY_ADDRESS, else a local instance)")
    p.add_argument("--actors", type=ranged(int, 1),
                   help="with --engine ray: classifier actors (default: the cluster's CPUs)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)
