"""`bloodcell study` end to end on synthetic images: every figure and table, the
public copy without dataset images, skipping finished generations on re-run."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell import cli
from bloodcell.modelfile import ModelFile
from bloodcell.report import discussion, markdown_to_html
from bloodcell.study import parse_epochs_cap, parse_models
from bloodcell.train import machine_name

FULL_FIGS = ["fig1_class_distribution.png", "example_grid.png", "fig2_accuracy.png",
             "fig2b_learning_curves.png", "fig3_confusion_pct.png", "fig3b_errors.png",
             "fig4_mistakes.png"]
PRIVATE_FIGS = {"example_grid.png", "fig4_mistakes.png"}
MODELS = ["dnn", "cnn", "cnn3"]


def _study_args(data, rep, pub, size=32):
    return ["study", "--data", str(data), "--out", str(rep), "--models", ",".join(MODELS),
            "--image-size", str(size), "--epochs-cap", "2", "--max-steps-per-epoch", "2",
            "--no-progress", "--public", str(pub)]


def _fake_screen(rep: Path):
    d = rep / "screen"
    d.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(d / "counts.png")
    Image.new("RGB", (40, 30), (30, 30, 200)).save(d / "example_crops.png")
    (d / "screen_report.md").write_text(
        "# Multi-cell screen\n\nIt finds **cells** in a slide.\n\n![counts](counts.png)\n\n"
        "![crops](example_crops.png)\n\n| slide | cells |\n|---|---|\n| a | 12 |\n")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One small study shared by the tests below (training is the slow part)."""
    from PIL import Image as PILImage

    from conftest import CLASSES, synthetic_cell
    tmp = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv("BLOODCELL_CACHE", str(tmp / "cache"))
    data = tmp / "data"
    for label, cls in enumerate(CLASSES):
        (data / cls).mkdir(parents=True)
        for i in range(10):
            PILImage.fromarray(synthetic_cell(label, seed=label * 100 + i)).save(data / cls / f"{cls}_{i}.png")
    (data / "neutrophil" / ".DS_000.jpg").write_bytes(b"\x00\x05Bud1 not an image")
    (data / "eosinophil" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    rep, pub = tmp / "report", tmp / "public"
    _fake_screen(rep)
    try:
        assert cli.main(_study_args(data, rep, pub)) == 0
    finally:
        mp.undo()
    return data, rep, pub


def _png_ok(p: Path):
    with Image.open(p) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 150, p


def test_study_writes_every_figure_and_table(study):
    data, rep, pub = study
    for f in FULL_FIGS:
        _png_ok(rep / "figures" / f)
        assert f"figures/{f}" in (rep / "report.md").read_text(), f
    md = (rep / "report.md").read_text()
    # the exact command, split, seed, per-run timings, library versions
    assert "bloodcell study --data" in md and "--epochs-cap 2" in md
    assert "seed 42" in md and "split.csv" in md and "torch " in md and "matplotlib " in md
    for m in MODELS:
        assert re.search(rf"\| Gen \d: {re.escape(m)} \| 32 \| 2 / 2 \|", md), m
    # the machine that trained each generation (its epochs' history), in the run table
    assert md.count(f"| {machine_name(torch.device('cpu'))} |") == len(MODELS)
    # skipped files listed by path and reason
    assert "`neutrophil/.DS_000.jpg`: hidden file" in md
    assert "`eosinophil/broken.jpg`: corrupt or truncated" in md
    # Table 1: one per-class table per generation with the macro average and a CI
    assert md.count("**macro average**") == len(MODELS)
    assert len(re.findall(r"95 % bootstrap CI \d+\.\d–\d+\.\d %", md)) == len(MODELS)
    assert "## Discussion" in md and "**Ranking**" in md
    # evaluation on all three splits, with sizes matching the shared split
    split = (rep / "split.csv").read_text().splitlines()[1:]
    n_test = sum(1 for r in split if r.split(",")[2] == "test")
    for m in MODELS:
        ev = json.loads((rep / "runs" / m / "study_eval.json").read_text())
        assert set(ev["splits"]) == {"train", "val", "test"}
        assert ev["splits"]["test"]["n_images"] == n_test
        meta = json.loads((rep / "runs" / m / "model.json").read_text())
        assert meta["finished"] and meta["image_size"] == 32
        # every generation trained on the study's one split
        assert (rep / "runs" / m / "split.csv").read_text() == (rep / "split.csv").read_text()
    # html is self-contained: every figure embedded, no external image links
    html = (rep / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FULL_FIGS) + 2  # + 2 screen figures
    assert 'src="figures/' not in html


def test_public_copy_has_no_dataset_images(study):
    _, rep, pub = study
    figs = {p.name for p in (pub / "figures").glob("*.png")}
    assert figs == set(FULL_FIGS) - PRIVATE_FIGS
    md = (pub / "report.md").read_text()
    assert "example_grid" not in md and "fig4_mistakes" not in md
    assert md.count("Not in this committed copy") == 2
    assert "bloodcell report --study" in md
    html = (pub / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FULL_FIGS) - len(PRIVATE_FIGS) + 1
    # the screen section is included, its dataset-image figure is not
    assert "Future work, done: the multi-cell screen" in md
    assert (pub / "figures" / "screen" / "counts.png").exists()
    assert not (pub / "figures" / "screen" / "example_crops.png").exists()
    assert "<table>" in html and "<strong>cells</strong>" in html


def test_rerun_skips_finished_generations_and_resumes_unfinished(study, caplog):
    data, rep, pub = study
    weights = {m: (rep / "runs" / m / "model.safetensors").stat().st_mtime_ns for m in MODELS}
    # mark one generation as interrupted after its last epoch: it must resume, not restart
    j = rep / "runs" / "cnn" / "model.json"
    meta = json.loads(j.read_text())
    meta["finished"] = False
    j.write_text(json.dumps(meta))
    caplog.set_level("INFO", logger="bloodcell")
    assert cli.main(_study_args(data, rep, pub)) == 0
    for m in ("dnn", "cnn3"):
        assert (rep / "runs" / m / "model.safetensors").stat().st_mtime_ns == weights[m], m
        assert f"study: {m} already trained" in caplog.text
    assert "study: resuming cnn" in caplog.text
    cnn = json.loads(j.read_text())
    assert cnn["finished"] and len(cnn["history"]) == 2  # continued from epoch 2, not retrained
    runs = json.loads((rep / "study.json").read_text())["runs"]
    assert "skipped on re-run" in runs["dnn"]["status"] and runs["cnn"]["status"] == "resumed"


def test_raising_an_epoch_cap_continues_a_capped_run(study, tmp_path, caplog):
    """A generation stopped by a cap (not by early stopping) goes on from its last epoch
    when the cap is raised; the others stay skipped."""
    import shutil
    data, rep, pub = study
    copy = tmp_path / "report"
    shutil.copytree(rep, copy)
    weights = (copy / "runs" / "dnn" / "model.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO", logger="bloodcell")
    args = _study_args(data, copy, tmp_path / "pub")
    args[args.index("--epochs-cap") + 1] = "2,cnn=3"
    assert cli.main(args) == 0
    assert "study: resuming cnn (3 epochs max" in caplog.text
    assert [r["epoch"] for r in json.loads((copy / "runs" / "cnn" / "model.json").read_text())["history"]] == [1, 2, 3]
    assert (copy / "runs" / "dnn" / "model.safetensors").stat().st_mtime_ns == weights


def test_finished_run_with_other_settings_is_refused(study, capsys):
    data, rep, pub = study
    assert cli.main(_study_args(data, rep, pub, size=40)) == 2
    err = capsys.readouterr().err
    assert "runs/dnn" in err and "image size is 32" in err
    # another seed: the report would state a seed its split and runs were not made with
    assert cli.main([*_study_args(data, rep, pub), "--seed", "7"]) == 2
    assert "split was made with another seed or fractions than --seed 7" in capsys.readouterr().err
    # a lower epoch cap than the finished runs trained: the report would contradict itself
    args = _study_args(data, rep, pub)
    args[args.index("--epochs-cap") + 1] = "1"
    assert cli.main(args) == 2
    assert "trained 2 epochs, over this study's cap of 1" in capsys.readouterr().err


def test_a_finished_run_is_not_held_back_by_an_old_unfinished_record(study, tmp_path):
    """study.json recorded a generation as unfinished (the study was killed while it trained),
    and a finished run of it is now in its folder: the study goes on and finishes."""
    import shutil
    data, rep, _ = study
    copy = tmp_path / "report"
    shutil.copytree(rep, copy)
    st = json.loads((copy / "study.json").read_text())
    st["runs"]["cnn"] = {"status": "trained", "finished": False, "wall_s": 3.5}
    (copy / "study.json").write_text(json.dumps(st))
    assert cli.main(_study_args(data, copy, tmp_path / "pub")) == 0
    st = json.loads((copy / "study.json").read_text())
    assert st["finished"] and st["runs"]["cnn"]["finished"] and "wall_s" not in st["runs"]["cnn"]


def test_a_run_on_a_reencoded_copy_counts_as_the_same_split(study, tmp_path, caplog, capsys):
    """A run trained elsewhere on a re-encoded copy of the same files (the lent GPU's compact
    copy) differs from the study's manifest only in content hashes: reused, not refused.
    Moving one file to another split is a different split: refused."""
    import hashlib
    import shutil
    data, rep, pub = study
    copy = tmp_path / "report"
    shutil.copytree(rep, copy)
    run = copy / "runs" / "cnn"
    rows = (run / "split.csv").read_text().splitlines()
    rows = [rows[0]] + [",".join(r.split(",")[:3] + ["0" * 40]) for r in rows[1:]]
    (run / "split.csv").write_text("\n".join(rows) + "\n")
    sha = hashlib.sha1((run / "split.csv").read_bytes()).hexdigest()
    replace(ModelFile.load(run / "model.json"), split_manifest_sha1=sha).save(run / "model.json")
    caplog.set_level("INFO", logger="bloodcell")
    assert cli.main(_study_args(data, copy, tmp_path / "pub")) == 0
    assert "study: cnn already trained" in caplog.text
    moved = rows[1].split(",")
    moved[2] = "test" if moved[2] != "test" else "train"
    (run / "split.csv").write_text("\n".join([rows[0], ",".join(moved)] + rows[2:]) + "\n")
    assert cli.main(_study_args(data, copy, tmp_path / "pub")) == 2
    assert "runs/cnn" in capsys.readouterr().err


def test_option_parsing():
    assert parse_epochs_cap("12, lite0-finetune=6") == {"*": 12, "lite0-finetune": 6}
    assert parse_epochs_cap(None) == {}
    for bad in ("x", "cnn=0", "nosuchmodel=3"):
        with pytest.raises(ValueError):
            parse_epochs_cap(bad)
    assert parse_models("cnn,dnn") == ["cnn", "dnn"]
    with pytest.raises(ValueError, match="unknown model"):
        parse_models("cnn,resnet5")
    with pytest.raises(ValueError, match="names no model"):
        parse_models(" , ")


def _fake_gen(model, acc, classes, n=100):
    cm = np.diag([n // len(classes)] * len(classes))
    cm[3, 6] = 9  # ig -> neutrophil, the study's main confusion
    per = {c: {"precision": acc, "recall": acc, "f1": acc, "support": n // len(classes)} for c in classes}
    split = {"accuracy": acc, "accuracy_ci95": [acc - 0.01, acc + 0.01], "macro_f1": acc,
             "n_images": n, "classes": classes, "per_class": per, "confusion_matrix": cm.tolist()}
    meta = ModelFile(architecture=model, classes=classes, image_size=128, best={"epoch": 2})
    return {"model": model, "generation": 1, "meta": meta,
            "history": [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}, {"epoch": 4}],
            "eval": {"splits": {"train": {**split, "accuracy": min(1, acc + 0.02)}, "val": split,
                                "test": split}}}


def test_discussion_compares_ranking_with_the_study():
    from conftest import CLASSES
    st = {"data": {"n_images": 11959, "split_counts": {"test": 2392}},
          "config": {"epochs_per_model": {}, "max_steps_per_epoch": None}}
    accs = {"dnn": 0.4, "cnn": 0.8, "cnn-aug": 0.85, "cnn3": 0.93, "lite0-frozen": 0.9,
            "lite0-finetune": 0.975}
    gens = [_fake_gen(m, a, CLASSES) for m, a in accs.items()]
    text = " ".join(discussion(st, gens, gens[-1]))
    assert "agrees with the study's" in text
    assert "ig→neutrophil (9)" in text and "128 px" in text and "70 %" in text
    accs["cnn"] = 0.95  # now beats cnn3 and the frozen backbone: the ranking differs
    gens = [_fake_gen(m, a, CLASSES) for m, a in accs.items()]
    text = " ".join(discussion(st, gens, gens[-1]))
    assert "differs from the study's" in text and "cnn 95.0 % vs cnn3 93.0 %" in text
    assert "Generation 5 on" not in text and "Unsteady" not in text


def test_discussion_names_the_closest_backbone_and_unsteady_runs():
    """Generation 5 on Lite0 and Lite2 frozen: the one closest to the study's 93 % (val) is
    named; a run whose validation accuracy jumps between epochs is named with its swing."""
    from conftest import CLASSES
    st = {"data": {"n_images": 11959, "split_counts": {"test": 2392}},
          "config": {"epochs_per_model": {}, "max_steps_per_epoch": None}}
    accs = {"dnn": 0.66, "cnn3": 0.93, "lite2-frozen": 0.89, "lite0-frozen": 0.91, "lite0-finetune": 0.98}
    gens = [_fake_gen(m, a, CLASSES) for m, a in accs.items()]
    gens[0]["history"] = [{"epoch": i + 1, "val_accuracy": v} for i, v in enumerate([0.40, 0.55, 0.51, 0.64])]
    text = " ".join(discussion(st, gens, gens[-1]))
    assert ("Generation 5 on 2 networks**: lite0-frozen val 91.0 %, lite2-frozen val 89.0 %; "
            "lite0-frozen is the closest to the study's 93 %") in text
    assert "dnn up to 4.0 points" in text and "cnn3 up to" not in text  # falls count, rises do not


def test_markdown_to_html(tmp_path):
    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG fake")
    out = markdown_to_html("## T\n\n- a `x<y`\n- b\n\n```\ncode <1>\n```\ntext *em*\n\n"
                           "| a | b |\n|---|---:|\n| 1 | **2** |\n\n![a fig](figs/f.png) ![gone](figs/x.png)",
                           {"figs/f.png": png})
    assert "<h2>T</h2>" in out and "<li>a <code>x&lt;y</code></li>" in out
    assert "<pre><code>code &lt;1&gt;\n</code></pre>" in out and "<em>em</em>" in out
    assert '<td style="text-align:right"><strong>2</strong></td>' in out
    # a known figure is embedded, an unknown one is not linked
    assert 'src="data:image/png;base64,iVBORyBmYWtl" alt="a fig"' in out
    assert "figs/x.png" not in out and "<em>gone</em>" in out


def test_per_model_image_size_and_epoch_caps():
    from bloodcell.study import StudyConfig, epochs_for, image_size_for, parse_epochs_cap, parse_image_size
    sizes = parse_image_size("128,lite0-finetune=160")
    assert sizes == {"*": 128, "lite0-finetune": 160}
    cfg = StudyConfig(data="d", out="o", image_size=sizes, epochs_cap=parse_epochs_cap("10,cnn=6"))
    assert image_size_for(cfg, "lite0-finetune") == 160 and image_size_for(cfg, "cnn") == 128
    assert epochs_for(cfg, "cnn") == 6 and epochs_for(cfg, "cnn3") == 10
    assert image_size_for(StudyConfig(data="d", out="o", image_size=96), "dnn") == 96
    assert image_size_for(StudyConfig(data="d", out="o"), "dnn") == 224  # the study's default
    for bad, msg in (("128,nosuchmodel=160", "nosuchmodel"), ("big", "not N or MODEL=N"),
                     ("8", "too small")):
        with pytest.raises((ValueError, KeyError), match=msg):
            parse_image_size(bad)


def test_report_cli_rebuilds_the_report_without_training(study, tmp_path, capsys):
    """`bloodcell report --public`: report.md/.html and figures rebuilt from the study
    folder's files (the numbers are the runs'), nothing trained, no figure with dataset
    images."""
    _, rep, _ = study
    weights = {p: p.stat().st_mtime_ns for p in (rep / "runs").rglob("*.safetensors")}
    pub = tmp_path / "public"
    assert cli.main(["report", "--study", str(rep), "--out", str(pub), "--public"]) == 0
    assert f"wrote {pub / 'report.md'}" in capsys.readouterr().out
    assert {p.name for p in (pub / "figures").glob("*.png")} == set(FULL_FIGS) - PRIVATE_FIGS
    md = (pub / "report.md").read_text()
    for m in MODELS:
        acc = json.loads((rep / "runs" / m / "study_eval.json").read_text())["splits"]
        row = " | ".join(f"{100 * acc[s]['accuracy']:.1f} %" for s in ("train", "val", "test"))
        assert re.search(rf"\| Gen \d: {re.escape(m)} \| {row} \|", md), (m, row)
    assert (pub / "report.html").read_text().count("data:image/png;base64,") == len(FULL_FIGS) - len(PRIVATE_FIGS) + 1
    assert weights == {p: p.stat().st_mtime_ns for p in (rep / "runs").rglob("*.safetensors")}
    assert "Notes on this run" not in md


def test_report_includes_notes_on_how_the_run_was_made(study, tmp_path, capsys):
    """--notes FILE (or REPORT_DIR/notes.md) goes in after the discussion; a missing file
    named on the command line is an error naming it."""
    _, rep, _ = study
    notes = tmp_path / "notes.md"
    notes.write_text("Generations 2-4 trained on a **lent GPU**, on a re-encoded copy.\n")
    out = tmp_path / "public"
    assert cli.main(["report", "--study", str(rep), "--out", str(out), "--public", "--notes", str(notes)]) == 0
    md = (out / "report.md").read_text()
    assert md.index("## Discussion") < md.index("## Notes on this run") < md.index("trained on a **lent GPU**")
    assert "<strong>lent GPU</strong>" in (out / "report.html").read_text()
    assert cli.main(["report", "--study", str(rep), "--out", str(out), "--notes", str(tmp_path / "no.md")]) == 2
    assert "no.md" in capsys.readouterr().err


def test_report_sets_another_run_beside_this_one(study, tmp_path, capsys):
    """The report writes summary.json; `--compare FOLDER` puts another run's numbers (its
    summary.json) beside this run's with the difference, in a table and the discussion;
    an old report's tables give the same summary (scripts/summary_from_report.py)."""
    import importlib.util
    _, rep, _ = study
    a = tmp_path / "a"
    assert cli.main(["report", "--study", str(rep), "--out", str(a), "--public"]) == 0
    rows = json.loads((a / "summary.json").read_text())
    assert [r["model"] for r in rows] == MODELS
    script = Path(__file__).parents[1] / "scripts" / "summary_from_report.py"
    spec = importlib.util.spec_from_file_location("sfr", script)
    sfr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sfr)
    parsed = sfr.summary((a / "report.md").read_text())
    for r, q in zip(rows, parsed):
        assert (q["model"], q["epochs_run"], q["stopped_by"]) == (r["model"], r["epochs_run"], r["stopped_by"])
        assert abs(q["accuracy"]["test"] - r["accuracy"]["test"]) <= 0.0005
    other = tmp_path / "capped"
    other.mkdir()
    cnn = next(r for r in rows if r["model"] == "cnn")
    cnn["accuracy"]["test"] -= 0.1
    (other / "summary.json").write_text(json.dumps([cnn]))
    b = tmp_path / "b"
    assert cli.main(["report", "--study", str(rep), "--out", str(b), "--public", "--compare", str(other)]) == 0
    md = (b / "report.md").read_text()
    assert f"## Beside the run in `{other}`" in md
    assert re.search(r"\| Gen \d: cnn \|.*\| \+10\.0 \|", md)
    assert "cnn +10.0" in md.split("## Discussion")[1]
    (other / "summary.json").write_text("{}")
    assert cli.main(["report", "--study", str(rep), "--out", str(b), "--compare", str(other)]) == 2
    assert "not a study summary" in capsys.readouterr().err


def test_the_published_numbers_are_data_the_report_reads(monkeypatch):
    """Every generation of the study has its published numbers in published_study.json,
    and the report's sentences follow that file: changed numbers change the text."""
    import dataclasses

    from conftest import CLASSES

    from bloodcell import published, report
    from bloodcell.study import STUDY_MODELS
    pub = published.study()
    assert set(STUDY_MODELS) <= {g.model for g in pub.generations}
    assert pub.generation("lite2-frozen").generation == pub.generation("lite0-frozen").generation == 5
    assert pub.generation("lite0-frozen").reference == ("val", 0.93)  # no test accuracy published
    assert [c.cls for c in pub.class_f1] == CLASSES and pub.test_images == sum(c.support for c in pub.class_f1)
    assert pub.backbone_generations == "5–6" and pub.val_only == "5"
    st = {"data": {"n_images": 11959, "split_counts": {"test": 2392}},
          "config": {"epochs_per_model": {}, "max_steps_per_epoch": None}}
    gens = [_fake_gen(m, 0.9, CLASSES) for m in STUDY_MODELS]
    text = " ".join(discussion(st, gens, gens[-1]))
    assert "cnn3 test 90.0 % vs 95 %" in text and "of the 17,092** the study used" in text
    assert "scored 63 % on validation but 20 % on test" in text
    other = dataclasses.replace(pub, n_images=20000, generations=tuple(
        dataclasses.replace(g, test_accuracy=0.5) if g.model == "cnn3" else g for g in pub.generations))
    monkeypatch.setattr(report, "published", lambda: other)
    text = " ".join(discussion(st, gens, gens[-1]))
    assert "cnn3 test 90.0 % vs 50 %" in text and "of the 20,000** the study used" in text


def test_a_broken_published_file_names_the_problem():
    from bloodcell import published
    raw = json.loads(published.SOURCE.read_text())
    assert published.parse(raw) == published.study()
    del raw["generations"][0]["val_accuracy"]
    with pytest.raises(TypeError, match="val_accuracy"):
        published.parse(raw)
