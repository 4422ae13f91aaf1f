"""The example cells shipped in the package (issue 18): what they are, that they are
attributed and packaged, and that the bundled model classifies them."""
from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest
from conftest import CLASSES

from bloodcell.predict import EXAMPLES_DIR, Classifier, example_files

ROOT = Path(__file__).resolve().parents[1]


def test_sixteen_files_two_per_class_small():
    files = example_files()
    assert len(files) == 16
    assert sorted({f.parent.name for f in files}) == CLASSES
    assert all(sum(f.parent.name == c for f in files) == 2 for c in CLASSES)
    assert sum(f.stat().st_size for f in files) < 500_000
    assert all(f.read_bytes()[:3] == b"\xff\xd8\xff" for f in files)  # the dataset's JPEG bytes


def test_attribution_lists_every_file_and_the_licence():
    text = (EXAMPLES_DIR / "README.md").read_text()
    for needed in ("Acevedo A, Merino A, Alférez S, Molina Á, Boldú L, Rodellar J",
                   "Data in Brief 30 (2020) 105474", "10.17632/snkd93bnjr.1", "CC BY 4.0",
                   "https://creativecommons.org/licenses/by/4.0/"):
        assert needed in text, needed
    for f in example_files():
        assert f"`{f.parent.name}/{f.name}`" in text, f.name


def test_package_data_ships_them():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["bloodcell"]
    pkg = ROOT / "src" / "bloodcell"
    for f in [*example_files(), EXAMPLES_DIR / "README.md"]:
        rel = f.relative_to(pkg).as_posix()
        assert any(fnmatch(rel, p) for p in patterns), rel


def test_bundled_model_classifies_the_examples():
    clf = Classifier.load(None, backend="torch", screen="auto")
    recs = clf.predict(example_files(), workers=0)
    right = [r["class"] == Path(r["path"]).parent.name for r in recs]
    assert sum(right) >= 15, [(r["path"], r["class"]) for r in recs]
    # chosen as clear single cells: none flagged by the multi-cell screen or the input checks
    assert not any(r["multi_cell"] or r["input_warnings"] for r in recs)


def test_cli_predict_examples(tmp_path, capsys):
    import csv
    import re

    from bloodcell.cli import main
    out = tmp_path / "examples.csv"
    assert main(["predict", "--examples", "--backend", "torch", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "differential count over 16 image(s)" in text
    right = int(re.search(r"(\d+) of 16 example cells predicted as their true class", text).group(1))
    assert right >= 15
    assert str(EXAMPLES_DIR / "README.md") in text  # where the attribution is
    listed = [ln for ln in text.splitlines() if ln.startswith(str(EXAMPLES_DIR))]
    assert len(listed) == 16  # listed even with --out: 16 lines are meant to be read
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["path"] for r in rows) == sorted(str(f) for f in example_files())
    # nothing to classify: one clear line, not an argparse traceback
    assert main(["predict"]) == 2
    assert "--examples" in capsys.readouterr().err


def test_evaluate_reads_the_examples_folder():
    from bloodcell.evaluate import evaluate
    m = evaluate(None, EXAMPLES_DIR, split="all", progress=False).metrics
    assert m["n_images"] == 16 and m["accuracy"] >= 15 / 16
    # too few for the 64/16/20 split: a message naming the folder and the way out
    with pytest.raises(ValueError, match=r"examples: class folder.s. with fewer than 3 images: "
                                         r"basophil \(2\).*--split all"):
        evaluate(None, EXAMPLES_DIR, split="test", progress=False)
