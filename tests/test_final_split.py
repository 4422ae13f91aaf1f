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
