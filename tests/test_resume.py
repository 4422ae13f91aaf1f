"""An interrupted `bloodcell predict` resumes from its journal: after a real SIGKILL
of the process, and never with records made by another model or screen."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import synthetic_cell

from bloodcell import batch as B
from bloodcell import predict as P
from bloodcell.screen import Screen
from test_predict import make_model

# Runs `bloodcell predict`, but decoding the input named *zz_block.png waits (touching
# $BLOCKED_FLAG) until $RELEASE_FLAG exists: the test then knows exactly which images
# are finished when it kills the process. Nothing of bloodcell is replaced.
RUNNER = """
import os, sys, time, pathlib
from PIL import Image

def _wait(name):
    if str(name).endswith("zz_block.png") and not os.path.exists(os.environ["RELEASE_FLAG"]):
        pathlib.Path(os.environ["BLOCKED_FLAG"]).touch()
        while not os.path.exists(os.environ["RELEASE_FLAG"]):
            time.sleep(0.05)

_open, _read = Image.open, pathlib.Path.read_bytes
Image.open = lambda fp, *a, **k: (_wait(fp), _open(fp, *a, **k))[1]
pathlib.Path.read_bytes = lambda self: (_wait(self), _read(self))[1]
from bloodcell.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_predict_killed_mid_run_resumes_from_its_journal(tmp_path):
    """SIGKILL a real `bloodcell predict` while it waits on its 5th image: the 4 images
    finished before it are in the journal (synced per batch, not left in a buffer),
    and the rerun takes them from there and computes only the rest. Fails if
    Journal.sync does nothing (a kill loses the buffered records)."""
    model = make_model(tmp_path / "model")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    names = [f"c{i}.png" for i in range(4)] + ["zz_block.png"] + [f"zz{i}.png" for i in range(3)]
    for i, n in enumerate(names):
        Image.fromarray(synthetic_cell(i % 8, seed=i)).save(imgs / n)
    paths = [str(imgs / n) for n in names]
    out = tmp_path / "res" / "results.json"
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "BLOCKED_FLAG": str(tmp_path / "blocked"),
           "RELEASE_FLAG": str(tmp_path / "release"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(runner), "predict", *paths, "--model", str(model), "--out", str(out),
           "--backend", "torch", "--no-screen", "--batch-size", "2", "--workers", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "blocked").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "predict never reached the 5th image"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not out.exists()
    lines = B.journal_path(out).read_text().splitlines()
    # (4 records are ~3 KB: a no-op sync would leave them all in the file's buffer)
    assert len(lines) == 1 + 4, lines
    assert sorted(json.loads(x)["path"] for x in lines[1:]) == paths[:4]

    (tmp_path / "release").touch()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["n_resumed"] == 4 and s["n_computed"] == 4 and s["n_ok"] == 8
    assert not B.journal_path(out).exists()
    fresh = P.Classifier.load(model, backend="torch", screen=None).predict(paths)
    assert [r["path"] for r in res["results"]] == paths
    for got, ref in zip(res["results"], fresh):
        assert got["class"] == ref["class"]
        assert got["probability"] == pytest.approx(ref["probability"], abs=1e-5)


class InterruptibleScreen(Screen):
    """The multi-cell screen, raising KeyboardInterrupt (Ctrl-C) after ``stop_after`` images."""
    seen, stop_after = 0, None

    def score_arrays(self, images):
        self.seen += len(images)
        if self.stop_after is not None and self.seen > self.stop_after:
            raise KeyboardInterrupt
        return super().score_arrays(images)


def bundled_screen(threshold=None, stop_after=None) -> InterruptibleScreen:
    """The bundled screen, or with another threshold (as a refit would give): the same
    class either way, so only the screen's parameters tell them apart."""
    b = Screen.load()
    scr = InterruptibleScreen(b.mixture, b.threshold if threshold is None else threshold,
                              b.image_size, b.params, b.info)
    scr.stop_after = stop_after
    return scr


def _model_and_six_cells(tmp_path):
    model = make_model(tmp_path / "model")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(6):
        Image.fromarray(synthetic_cell(i % 8, seed=i)).save(imgs / f"c{i}.png")
    return model, imgs, tmp_path / "results.csv"


def test_refitted_screen_is_not_served_from_the_journal(tmp_path):
    """A resumed run reuses records only when the screen is the same: with a refitted
    screen (another threshold) the journal is ignored and every image is screened
    again. Fails if the journal's fingerprint names the screen only by class and size."""
    model, imgs, out = _model_and_six_cells(tmp_path)

    def run(screen):
        clf = P.Classifier.load(model, backend="torch", screen=screen)
        return B.predict_paths(clf, [str(imgs)], out=out, batch_size=2, workers=0, progress=False)

    with pytest.raises(KeyboardInterrupt):
        run(bundled_screen(stop_after=4))
    assert B.journal_path(out).exists()
    refit = bundled_screen(threshold=-1e6)  # flags every image
    recs, s = run(refit)
    assert s["n_resumed"] == 0 and refit.seen == 6
    assert all(r["multi_cell"] for r in recs)
    # the same screen again does resume
    with pytest.raises(KeyboardInterrupt):
        run(bundled_screen(stop_after=4))
    same = bundled_screen()
    recs, s = run(same)
    assert s["n_resumed"] == 4 and same.seen == 2


def test_resumed_records_name_the_files_as_this_command_does(tmp_path, monkeypatch):
    """Interrupted with relative paths in one folder, resumed from another with absolute
    ones: every record's path is this command's (a stale relative path points nowhere)."""
    model, imgs, out = _model_and_six_cells(tmp_path)
    monkeypatch.chdir(tmp_path)
    clf = P.Classifier.load(model, backend="torch", screen=bundled_screen(stop_after=4))
    with pytest.raises(KeyboardInterrupt):
        B.predict_paths(clf, ["imgs"], out=out, batch_size=2, workers=0, progress=False)
    monkeypatch.chdir(imgs)
    clf = P.Classifier.load(model, backend="torch", screen=bundled_screen())
    recs, s = B.predict_paths(clf, [str(imgs)], out=out, batch_size=2, workers=0, progress=False)
    assert s["n_resumed"] == 4
    assert sorted(r["path"] for r in recs) == sorted(str(imgs / f"c{i}.png") for i in range(6))
