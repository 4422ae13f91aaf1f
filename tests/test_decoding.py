"""Decoding ahead of the model in worker processes: the same records as threads, in the
same order, bad files skipped alike, and a worker process that dies loses no image."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import synthetic_cell

from bloodcell import batch as B
from bloodcell import decoding as D
from bloodcell import predict as P
from bloodcell.screen import Screen
from test_predict import make_model

N = 40


@pytest.fixture
def cells(tmp_path):
    d = tmp_path / "cells"
    d.mkdir()
    for i in range(N):
        Image.fromarray(synthetic_cell(i % 8, size=96, seed=i)).save(d / f"c{i:03d}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (d / "empty.png").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def screen():
    return Screen.load()  # the bundled multi-cell screen: decode and screen both run in the workers


def _run(clf, cells, tmp_path, decode, name):
    return B.predict_paths(clf, [str(cells)], out=tmp_path / f"{name}.csv", progress=False,
                           decode=decode, workers=2, batch_size=16)


def test_processes_give_the_records_threads_give(cells, tmp_path, screen):
    clf = P.Classifier.load(make_model(tmp_path / "model"), backend="torch", screen=screen)
    threads, s_threads = _run(clf, cells, tmp_path, "threads", "t")
    procs, s_procs = _run(clf, cells, tmp_path, "processes", "p")
    assert s_threads["decode"] == "threads" and s_procs["decode"] == "processes"
    assert [r["path"] for r in procs] == [r["path"] for r in threads]
    assert sum(r["status"] == "ok" for r in procs) == N
    assert {r["path"].rsplit("/", 1)[1]: r["status"] for r in procs if r["status"] != "ok"} == {
        "broken.jpg": threads[[r["path"].endswith("broken.jpg") for r in threads].index(True)]["status"],
        "empty.png": "skipped: empty file (0 bytes)"}
    for a, b in zip(procs, threads):  # the same computation, bit for bit
        assert a == b
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "t.csv").read_bytes()


class DyingScreen:
    """A stand-in screen that kills its worker process on one image (as a decoder crashing
    in C would), and scores normally anywhere else."""
    image_size = 64
    params = None

    def score_arrays(self, images):
        if multiprocessing.parent_process() is not None and images[0].mean() > 0 \
                and int(images[0][0, 0, 1]) == 7:
            os._exit(3)
        return [{"score": -1.0, "n_regions": 1, "multi_cell": False} for _ in images]


@pytest.mark.parametrize("n, dies", [(N, 5), (240, 200)])  # all handed out already / mid-job
def test_a_worker_process_that_dies_loses_no_image(tmp_path, caplog, n, dies):
    d = tmp_path / "cells"
    d.mkdir()
    for i in range(n):
        img = synthetic_cell(i % 8, size=64, seed=i)
        img[0, 0, 1] = 7 if i == dies else 8  # this image kills the worker that screens it
        Image.fromarray(img).save(d / f"c{i:03d}.png")
    clf = P.Classifier.load(make_model(tmp_path / "model"), backend="torch", screen=DyingScreen())
    with caplog.at_level("WARNING", logger="bloodcell"):
        recs, summary = _run(clf, d, tmp_path, "processes", "r")
    assert summary["n_ok"] == n and all(r["status"] == "ok" for r in recs)
    assert [r["path"] for r in recs] == sorted(str(f) for f in d.iterdir())
    assert caplog.text.count("decode worker process failed") == 1  # said once, not per chunk
    assert all(r["multi_cell"] is False for r in recs)


def test_auto_uses_processes_only_for_big_jobs_on_several_workers():
    big = D.PROCESS_MIN_INPUTS
    assert D.use_processes("auto", big, 2) and not D.use_processes("auto", big - 1, 2)
    assert not D.use_processes("auto", big, 1)  # one worker: threads cost no start-up
    assert D.use_processes("processes", 5, 2) and not D.use_processes("processes", 5, 0)
    assert not D.use_processes("threads", 10 ** 6, 4)
    with pytest.raises(ValueError, match="decode mode"):
        D.use_processes("fork", 10, 2)


def test_cli_decode_option(cells, tmp_path, capsys):
    from bloodcell.cli import main
    model = make_model(tmp_path / "model")
    assert main(["predict", str(cells), "--model", str(model), "--backend", "torch", "--no-progress",
                 "--no-screen", "--decode", "processes", "--out", str(tmp_path / "r.json")]) == 0
    assert "decode processes" in capsys.readouterr().out


def test_worker_processes_import_neither_torch_nor_onnxruntime(tmp_path, screen):
    """The workers only decode and screen: a fresh interpreter each, so what they import
    is what they cost in start-up and memory (torch alone is ~1 s and ~300 MB)."""
    pool = D.DecodePool(D.Decoder(64, None, screen), workers=1, processes=True)
    try:
        img = tmp_path / "c.png"
        Image.fromarray(synthetic_cell(2, size=64, seed=1)).save(img)
        (arrays, why), = pool.result(pool.submit([str(img)]), [str(img)])
        assert why is None and arrays["model"].shape == (64, 64, 3) and arrays["screen"] is not None
        loaded = pool.ex.submit(eval, "sorted(m for m in ('torch', 'onnxruntime', 'sklearn') "
                                      "if m in __import__('sys').modules)").result()
        assert loaded == []
    finally:
        pool.close()


def test_summary_says_what_decoded():
    from bloodcell.cli.predict import decoders
    assert decoders({"workers": 2, "decode": "processes"}) == "2 decode processes"
    assert decoders({"workers": 1, "decode": "processes"}) == "1 decode process"
    assert decoders({"workers": 2, "decode": "threads"}) == "2 decode threads"
    assert decoders({"workers": 1}) == "1 decode thread"
    assert decoders({"workers": 0, "decode": "threads"}) == "decoded inline"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_leave_when_the_main_process_is_killed(tmp_path):
    """SIGKILL (or the OOM killer) gives the main process no chance to stop its pool: the
    workers notice they are orphans and exit instead of idling on."""
    import signal
    import subprocess
    import sys
    import time
    code = ("from bloodcell import decoding as D\n"
            "pool = D.DecodePool(D.Decoder(64), workers=2, processes=True)\n"
            "pool.ex.submit(int).result()\n"
            "print('ready', flush=True)\n"
            "import time; time.sleep(600)\n")
    main = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert main.stdout.readline().strip() == "ready"
        workers = _children(main.pid)
        assert len(workers) >= 2
        main.send_signal(signal.SIGKILL)
        main.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "decode workers outlived their main process"
    finally:
        main.kill()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:  # a zombie has exited: its stat says state Z
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False
