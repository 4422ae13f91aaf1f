"""scripts/final_split.py: the final model's manifest moves a stratified share of val to
train, never touches test, and is the same for the same seed."""
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "final_split.py"


@pytest.fixture(scope="module")
def fs():
    spec = importlib.util.spec_from_file_location("final_split", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows():
    out = []
    for cls, n in (("a", 40), ("b", 10)):
        for i in range(n):
            split = "test" if i % 5 == 0 else ("val" if i % 5 == 1 else "train")
            out.append({"path": f"{cls}/{i}.jpg", "class": cls, "split": split, "sha1": "x"})
    return out


def test_share_of_each_class_moves_and_test_is_untouched(fs):
    before = rows()
    after = fs.final_rows(before, 0.5, seed=0)
    for b, a in zip(before, after):
        if b["split"] == "test":
            assert a["split"] == "test"
        if b["split"] == "train":
            assert a["split"] == "train"
    moved = Counter(b["class"] for b, a in zip(before, after) if b["split"] == "val" and a["split"] == "train")
    assert moved == {"a": 4, "b": 1}  # round(0.5 * 8) and round(0.5 * 2)
    assert fs.final_rows(before, 0.5, seed=0) == after
    assert fs.final_rows(before, 0.5, seed=1) != after


def test_writes_a_manifest_train_reads(fs, tmp_path):
    import csv
    src = tmp_path / "split.csv"
    with open(src, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "class", "split", "sha1"])
        w.writeheader()
        w.writerows(rows())
    assert fs.main([str(src), "--to-train", "0.25", "--out", str(tmp_path / "final.csv")]) == 0
    from bloodcell.data import read_manifest
    m = read_manifest(tmp_path / "final.csv")
    assert Counter(s for _, s in m.values()) == {"train": 32, "test": 10, "val": 8}
    with pytest.raises(ValueError, match="between 0 and 1"):
        fs.final_rows(rows(), 1.0, seed=0)


def test_last_epoch_model_is_the_last_checkpoints_weights(synthetic_dataset, tmp_path):
    """scripts/last_epoch_model.py: the written model holds the last epoch's weights (not
    the best-on-val ones), drops the stale calibration, and loads like any model."""
    import json

    import torch
    from safetensors.torch import load_file

    from bloodcell.models import load_model
    from bloodcell.train import TrainConfig, train
    spec = importlib.util.spec_from_file_location("last_epoch_model", SCRIPT.with_name("last_epoch_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run, out = tmp_path / "run", tmp_path / "last"
    train(TrainConfig(model="cnn", data=str(synthetic_dataset), out=str(run), image_size=32, epochs=3,
                      batch_size=16, lr=3e-3, patience=0, progress=False, pretrained=False))
    assert mod.main([str(run), str(out)]) == 0
    ckpt = load_file(str(run / "checkpoint" / "last.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert got and all(torch.equal(v, ckpt[f"model.{k}"]) for k, v in got.items())
    meta = json.loads((out / "model.json").read_text())
    assert meta["best"]["epoch"] == 3 and meta["temperature"] == 1.0 and "review_threshold" not in meta
    model, _ = load_model(out)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 8)
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "nothing"), str(tmp_path / "x")])
