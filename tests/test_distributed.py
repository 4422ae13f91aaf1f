"""`torchrun --standalone --nproc_per_node 2 -m bloodcell train`: two CPU processes (gloo)
on 320 synthetic images learn well above chance on the unseen test split, rank 0 alone
logs and writes, and --resume continues the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, synthetic_cell

from bloodcell import distributed as dist
from bloodcell.evaluate import evaluate


@pytest.fixture
def cells320(tmp_path):
    root = tmp_path / "cells"
    for label, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(synthetic_cell(label, size=32, seed=label * 1000 + i)).save(root / cls / f"{i}.png")
    return root


def _torchrun(data, run, epochs, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bloodcell", "train", "--model", "cnn", "--data", str(data), "--out", str(run),
           "--epochs", str(epochs), "--image-size", "32", "--batch-size", "32", "--lr", "3e-3",
           "--patience", "0", "--no-pretrained", "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


def test_torchrun_two_processes_learn_and_resume(cells320, tmp_path):
    run = tmp_path / "run"
    err = _torchrun(cells320, run, 3)
    assert err.count("epoch 1: ") == 1  # rank 0 logs, rank 1 does not
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs_run"] == 3
    _torchrun(cells320, run, 5, "--resume")
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]
    m = evaluate(run, cells320, split="test", progress=False).metrics
    assert m["n_images"] == 64 and m["accuracy"] > 0.5  # chance: 0.125


def test_one_process_is_a_world_of_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    w = dist.from_env()
    assert w.main and not w.distributed and dist.start(w) is None
    idx = np.arange(10)
    assert (dist.shard(idx, w) == idx).all() and dist.total([1.0, 2.0], w, None) == [1.0, 2.0]
    two = [dist.World(r, 2) for r in (0, 1)]
    parts = [dist.shard(idx, w) for w in two]
    assert sorted(np.concatenate(parts)) == list(idx) and len(parts[0]) == len(parts[1]) == 5
