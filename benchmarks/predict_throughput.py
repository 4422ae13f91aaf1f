"""End-to-end prediction throughput: image files on disk -> classes.

    .venv/bin/python benchmarks/predict_throughput.py [--model M] [--data DIR] [-n 2000]
        [--backends torch,onnx,onnx-int8] [--batch-sizes 32,64,128] [--workers 2]
    .venv/bin/python benchmarks/predict_throughput.py --whole-process -n 3418 [PREDICT OPTIONS]

``--whole-process`` times what a user runs: ``bloodcell predict FOLDER --out r.csv``
as a fresh process over N files (the default settings: screen on), start-up
included, with its peak resident memory, the start-up alone (the same command on
one image) and, beside it, the one-thread decode-only rate of the same files.

For each backend and batch size, runs ``Classifier.predict`` (decode threads
overlapped with the model, exactly what ``bloodcell predict`` does) over the
first N files of the data folder and prints a markdown table of images/s, plus
decode-only and model-only figures for context. Files are read once before
timing, so every row sees the same warm page cache.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bloodcell.cpu import describe
from bloodcell.data import default_data_dir, iter_image_files
from bloodcell.modelfile import BUNDLED_DIR, bundled_model_path
from bloodcell.predict import Classifier, default_workers
from bloodcell.transforms import preprocess


def default_model() -> Path:
    try:
        return bundled_model_path()
    except FileNotFoundError:
        run = Path(__file__).resolve().parents[1] / "runs" / "recipe-s42" / "model.json"
        if run.exists():
            return run
        raise


def files_of(root: Path, n: int) -> list[Path]:
    # interleave the class folders so the first N hold every class (as a real slide would)
    per = [[p for p, why in iter_image_files(d) if why is None]
           for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    out, i = [], 0
    while len(out) < n and any(i < len(p) for p in per):
        out += [p[i] for p in per if i < len(p)]
        i += 1
    return out[:n]


def timed(fn, repeat=1):
    """Best wall time of ``repeat`` runs, and the process CPU time (all threads) of that run."""
    best, cpu = float("inf"), float("nan")
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        fn()
        t, c = time.perf_counter() - t, time.process_time() - c
        if t < best:
            best, cpu = t, c
    return best, cpu


def tree_rss_mb(pid: int) -> float:
    """Resident MB of a process and all its descendants (decode worker processes), summed:
    libraries shared between them count once per process, so this overstates the total."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    total, todo = 0.0, [pid]
    while todo:
        q = todo.pop()
        todo += kids.get(q, [])
        try:
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def run_process(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak resident MB (of the process and its worker processes together,
    sampled every 50 ms) and CPU seconds (user + system, all threads and reaped worker
    processes) of one child process."""
    import subprocess
    import threading
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, running = [0.0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], tree_rss_mb(p.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    running[0] = False
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr.read().decode()[-2000:]}")
    # ru_maxrss (Linux: kilobytes) is the largest single process: a floor when sampling missed the peak
    return wall, max(peak[0], ru.ru_maxrss / 1024), ru.ru_utime + ru.ru_stime


def whole_process(files: list[Path], extra: list[str], repeat: int) -> None:
    """``bloodcell predict`` over a folder holding exactly ``files`` (links), as a new process."""
    import tempfile

    from bloodcell.transforms import preprocess as decode
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cells"
        folder.mkdir()
        for i, f in enumerate(files):  # links: the files as they are, names kept unique
            (folder / f"{i:06d}_{f.name}").symlink_to(f.resolve())
        cmd = [sys.executable, "-m", "bloodcell", "predict", "--no-progress", *extra]
        run_process(cmd + [str(next(folder.iterdir())), "--out", f"{tmp}/warm.csv"])  # ONNX export, caches
        one = min(run_process(cmd + [str(next(folder.iterdir())), "--out", f"{tmp}/one.csv"])[:3:2]
                  for _ in range(repeat))
        load0 = os.getloadavg()[0]
        runs = [run_process(cmd + [str(folder), "--out", f"{tmp}/r.csv"]) for _ in range(repeat)]
        wall, _, cpu = min(runs)
        rss = max(r[1] for r in runs)
        # right after the runs: the decode-only rates under the same load, best of two passes
        # (ours, and the plain draft-mode decode the ratio was first measured against)
        t, _ = timed(lambda: [decode(f, 128) for f in files], 2)
        td, _ = timed(lambda: [draft_decode(f, 128) for f in files], 2)
        load1 = os.getloadavg()[0]
    n = len(files)
    print("| files | whole process (s) | images/s incl. start-up | start-up, 1 image (s) "
          "| peak RSS, all processes (MB) | CPU ms/image (start-up incl.) | decode-only, 1 thread (img/s): "
          "preprocess / draft | ratio to each |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {n} | {wall:.1f} | {n / wall:.0f} | {one[0]:.2f} (CPU {one[1]:.2f}) | {rss:.0f} "
          f"| {1000 * cpu / n:.2f} | {n / t:.0f} / {n / td:.0f} | {t / wall:.2f} / {td / wall:.2f} |")
    print(f"\ncommand: {' '.join(cmd)} FOLDER --out r.csv; best of {repeat}; decode-only, one thread, "
          f"over the same {n} files right after, best of 2: transforms.preprocess(file, 128) (bloodcell's "
          "own: full-scale JPEG decode, centre square, antialiased resize) and a plain PIL draft-mode "
          "decode + resize to 128 px (JPEG decoded at half scale); "
          f"load average {load0:.1f} before the runs, {load1:.1f} after the decode-only passes; "
          f"{describe()}")


def draft_decode(path, size: int):
    """The cheapest decode to ``size`` px: JPEG decoded at a reduced scale (PIL draft mode),
    then resized; not bloodcell's preprocessing, only a reference rate."""
    from PIL import Image
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run folder or model.json (default: bundled, else runs/recipe-s42)")
    ap.add_argument("--data", help="image folder (default ../shared/data/pbc)")
    ap.add_argument("-n", type=int, default=2000, help="number of files (default 2000)")
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--batch-sizes", default="32,64,128")
    ap.add_argument("--workers", default=str(default_workers()), help="decode threads, comma list")
    ap.add_argument("--threads", default="0", help="model compute threads, comma list (0 = all cores)")
    ap.add_argument("--repeat", type=int, default=1, help="best of R runs per row")
    ap.add_argument("--screen", action="store_true",
                    help="also time the fastest setting with the bundled multi-cell screen on")
    ap.add_argument("--whole-process", action="store_true",
                    help="time `bloodcell predict FOLDER` as a new process (start-up, peak memory)")
    a, extra = ap.parse_known_args(argv)  # --whole-process passes the rest to bloodcell predict
    if extra and not a.whole_process:
        ap.error(f"unrecognised arguments: {' '.join(extra)}")
    data = Path(a.data) if a.data else default_data_dir()
    if data is None or not data.is_dir():
        sys.exit("no data folder: pass --data DIR")
    model = Path(a.model) if a.model else default_model()
    files = files_of(data, a.n)
    for f in files:  # warm the page cache: measure decoding, not the disk
        f.read_bytes()
    n = len(files)
    print(f"model {model}; {n} files from {data}; {os.cpu_count()} CPU(s), "
          f"{describe()}; load average {os.getloadavg()[0]:.2f} "
          "(background jobs lower these figures)\n")
    if a.whole_process:
        return whole_process(files, (["--model", a.model] if a.model else []) + extra, a.repeat)

    threads = [int(x) or None for x in a.threads.split(",")]
    # the bundled model loads as `bloodcell predict` loads it: with the other-labs model, if shipped
    if not a.model and model.parent == BUNDLED_DIR:
        model, fallback = None, "auto"
    else:
        fallback = None
    clf = Classifier.load(model, backend="torch", screen=None, fallback=fallback)
    size = clf.image_size
    sub = files[: min(n, 500)]
    t, c = timed(lambda: [preprocess(f, size) for f in sub])
    print(f"decode+preprocess alone, 1 thread: {len(sub) / t:.0f} images/s "
          f"({1000 * c / len(sub):.2f} CPU ms/image)")
    arrays = np.stack([preprocess(f, size) for f in sub[:256]])

    rows = []
    import torch
    default_torch_threads = torch.get_num_threads()
    for backend in a.backends.split(","):
      for th in threads:
        torch.set_num_threads(th or default_torch_threads)
        clf = Classifier.load(model, backend=backend, screen=None, threads=th, fallback=fallback)
        label = backend + (f" ({th} thread{'s' if th > 1 else ''})" if th else "")
        clf.predict_proba_arrays(arrays[:32])  # warm-up (thread pools, allocations)
        t, c = timed(lambda: [clf.predict_proba_arrays(arrays[i:i + 64]) for i in range(0, len(arrays), 64)])
        print(f"model alone, {label}, batch 64: {len(arrays) / t:.0f} images/s "
              f"({1000 * c / len(arrays):.2f} CPU ms/image)")
        for bs in [int(b) for b in a.batch_sizes.split(",")]:
            for w in [int(x) for x in a.workers.split(",")]:
                t, c = timed(lambda: clf.predict(files, batch_size=bs, workers=w), a.repeat)
                rows.append((label, bs, w, n / t, t, 1000 * c / n, backend, th))
                print(f"  {label} batch {bs} workers {w}: {n / t:.0f} images/s", file=sys.stderr)

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # CPU ms/image counts every thread of this process; on a busy machine it is the fairer
    # figure: ncpu*1000/that is what the same work would give with the cores to itself
    print(f"\n| backend | batch | decode workers | images/s (files -> classes) | seconds "
          f"| CPU ms/image | if {ncpu} idle cores (img/s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend, bs, w, ips, t, cms, *_ in rows:
        print(f"| {backend} | {bs} | {w} | {ips:.0f} | {t:.1f} | {cms:.2f} | {ncpu * 1000 / cms:.0f} |")
    best = max(rows, key=lambda r: r[3])
    if a.screen:  # each backend's best setting again, with the multi-cell screen on
        for label in dict.fromkeys(r[0] for r in rows):
            r = max((r for r in rows if r[0] == label), key=lambda r: r[3])
            clf = Classifier.load(model, backend=r[6], screen="auto", threads=r[7], fallback=fallback)
            if clf.screen is None:
                print("(no bundled multi-cell screen: not timed)")
                break
            t, c = timed(lambda: clf.predict(files, batch_size=r[1], workers=r[2]), a.repeat)
            print(f"| {label} + multi-cell screen | {r[1]} | {r[2]} | {n / t:.0f} | {t:.1f} "
                  f"| {1000 * c / n:.2f} | {ncpu * n / c:.0f} |")
    print(f"\nbest: {best[0]}, batch {best[1]}, {best[2]} decode worker(s): {best[3]:.0f} images/s end-to-end")


if __name__ == "__main__":
    main()
