"""Prediction API and `bloodcell predict`: inputs of every kind, skipped files,
resume after an interruption, multi-cell screen hook, differential count."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNDLED_BACKEND, CLASSES, synthetic_cell

from bloodcell import modelfile as MF
from bloodcell.cli.predict import format_summary, print_records
from bloodcell.differential import differential_count, leukocyte_differential, proportion_ci
from bloodcell import batch as B
from bloodcell import predict as P
from bloodcell.models import create_model, save_model


def make_model(dirpath, size=64, seed=0, gain=20.0):
    """A random cnn3 with a scaled-up head, so its answers are confident and vary by image."""
    torch.manual_seed(seed)
    m = create_model("cnn3", len(CLASSES), size)
    with torch.no_grad():
        m[-1].weight.mul_(gain)
    save_model(m, {"architecture": "cnn3", "classes": CLASSES, "image_size": size}, dirpath)
    return dirpath


@pytest.fixture
def model_dir(tmp_path):
    return make_model(tmp_path / "model")


@pytest.fixture
def clf(model_dir):
    return P.Classifier.load(model_dir, backend="torch", screen=None)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(10):
        Image.fromarray(synthetic_cell(i % 8, seed=i)).save(d / "sub" / f"c{i:02d}.png")
    return d


def test_bundled_model_default_path(model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(MF, "BUNDLED_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no bundled model"):
        P.Classifier.load()
    monkeypatch.setattr(MF, "BUNDLED_DIR", model_dir)
    clf = P.Classifier.load(backend="torch")
    (r,) = clf.predict(synthetic_cell(3))
    assert r["status"] == "ok" and r["class"] in CLASSES


def test_shipped_bundled_model_predicts():
    clf = P.Classifier.load(backend="torch")
    (r,) = clf.predict(synthetic_cell(3, size=clf.image_size))
    assert r["status"] == "ok" and abs(sum(r["probabilities"].values()) - 1) < 1e-5


def test_shipped_int8_file_belongs_to_the_bundled_weights():
    """The bundled int8 ONNX file is the bundled model quantised: it loads (provenance
    checked against the weights) and mostly agrees with the float model."""
    q = P.Classifier.load(backend="onnx-int8", screen=None)
    t = P.Classifier.load(backend="torch", screen=None)
    x = np.stack([synthetic_cell(k % 8, size=t.image_size, seed=k) for k in range(16)])
    pq, pt = q.predict_proba_arrays(x), t.predict_proba_arrays(x)
    assert np.allclose(pq.sum(1), 1, atol=1e-5)
    assert (pq.argmax(1) == pt.argmax(1)).mean() >= 0.8
    # the measured recipe (8-bit weights, stem and head in float), so --backend auto runs it
    # on CPUs with an int8 dot product and the float model elsewhere
    from bloodcell.export import onnx_metadata
    meta = onnx_metadata(q.onnx_path)
    assert meta["bloodcell_int8_weight_bits"] == "8" and meta["bloodcell_int8_float_nodes"] == "stem,head"
    auto = P.Classifier.load(backend="auto", screen=None)
    assert auto.backend == BUNDLED_BACKEND


def test_record_fields_and_probabilities(clf):
    recs = clf.predict([synthetic_cell(k, seed=k) for k in range(8)])
    assert len({r["class"] for r in recs}) > 1  # the fixture model is not constant
    as_batch = clf.predict(np.stack([synthetic_cell(k, seed=k) for k in range(8)]))
    assert [r["class"] for r in as_batch] == [r["class"] for r in recs]
    for r in recs:
        assert r["status"] == "ok"
        p = r["probabilities"]
        assert list(p) == CLASSES
        assert abs(sum(p.values()) - 1) < 1e-5
        assert r["class"] == max(p, key=p.get) and r["probability"] == pytest.approx(p[r["class"]])
        assert [t["class"] for t in r["top3"]][0] == r["class"]
        tp = [t["probability"] for t in r["top3"]]
        assert tp == sorted(tp, reverse=True) and len(tp) == 3
        assert r["needs_review"] == (r["probability"] < clf.review_threshold)


def test_same_image_in_many_formats(clf, tmp_path):
    rgb = synthetic_cell(5, size=96, seed=1)
    im = Image.fromarray(rgb)
    paths = {}
    for name, img, ext in [("png", im, "png"), ("jpeg", im, "jpg"), ("rgba", im.convert("RGBA"), "png"),
                           ("gray", im.convert("L"), "png"), ("bmp", im, "bmp")]:
        paths[name] = tmp_path / f"x_{name}.{ext}"
        img.save(paths[name])
    g16 = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    paths["gray16"] = tmp_path / "x_gray16.png"
    Image.fromarray(g16).save(paths["gray16"])
    assert Image.open(paths["gray16"]).mode.startswith("I")
    inputs = list(paths.values()) + [im, rgb, paths["png"].read_bytes()]
    recs = clf.predict(inputs)
    assert all(r["status"] == "ok" for r in recs), recs
    for r in recs:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
    by = dict(zip(list(paths) + ["pil", "array", "bytes"], recs))
    # lossless inputs of the same pixels give the same answer
    for k in ("pil", "array", "bytes", "bmp"):
        assert by[k]["probabilities"] == pytest.approx(by["png"]["probabilities"], abs=1e-6)
    # an 8-bit grey PNG and its 16-bit version are the same picture
    assert by["gray16"]["probabilities"] == pytest.approx(by["gray"]["probabilities"], abs=1e-3)
    assert by["jpeg"]["class"] == by["png"]["class"]


def test_bad_inputs_are_skipped_and_run_continues(clf, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(synthetic_cell(1)).save(good)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:200])
    inputs = [tmp_path / "corrupt.jpg", good, tmp_path / "empty.png", tmp_path / "notes.txt",
              tmp_path / "missing.jpg", trunc, tmp_path, np.zeros((3, 3)), good]
    recs = clf.predict(inputs, batch_size=2, workers=2)
    st = [r["status"] for r in recs]
    assert st[1] == "ok" and st[-1] == "ok"
    assert recs[1]["probabilities"] == recs[-1]["probabilities"]
    for i in (0, 2, 3, 4, 5, 6, 7):
        assert st[i].startswith("skipped: "), (i, st[i])
    assert "empty" in st[2] and "no such file" in st[4] and "folder" in st[6]
    assert recs[0]["path"].endswith("corrupt.jpg")


def test_workers_and_batches_do_not_change_results(clf, image_dir):
    files = sorted(image_dir.rglob("*.png"))
    a = clf.predict(files, batch_size=64, workers=0)
    b = clf.predict(files, batch_size=3, workers=3)
    assert [r["path"] for r in a] == [str(f) for f in files]
    assert [r["probabilities"] for r in a] == [pytest.approx(r["probabilities"], abs=1e-6) for r in b]


def test_expand_inputs_folders_globs_missing(image_dir, tmp_path):
    (image_dir / "notes.txt").write_text("x")
    (image_dir / ".hidden.png").write_bytes(b"x")
    items = B.expand_inputs([str(image_dir), str(image_dir / "sub" / "c0*.png"),
                             str(tmp_path / "nope.jpg"), str(tmp_path / "zz*.png")])
    paths = [p for p, _ in items]
    assert len(paths) == len(set(os.path.abspath(p) for p in paths))  # each file once
    ok = [p for p, why in items if why is None]
    assert len(ok) == 10
    why = {os.path.basename(p): w for p, w in items if w}
    assert "extension" in why["notes.txt"] and "hidden" in why[".hidden.png"]
    assert why["nope.jpg"] == "no such file or folder" and "matched nothing" in why["zz*.png"]


def test_differential_count():
    recs = ([{"status": "ok", "class": "neutrophil", "needs_review": False}] * 6
            + [{"status": "ok", "class": "lymphocyte", "needs_review": True}] * 2
            + [{"status": "ok", "class": "neutrophil", "multi_cell": True, "needs_review": False}] * 2
            + [{"status": "skipped: empty file"}])
    d = differential_count(recs, CLASSES)
    assert d["n_counted"] == 8 and d["n_multi_cell"] == 2 and d["n_ok"] == 10
    assert d["counts"]["neutrophil"] == 6 and d["counts"]["lymphocyte"] == 2
    assert d["percent"]["neutrophil"] == pytest.approx(75.0) and d["percent"]["platelet"] == 0
    assert d["n_needs_review"] == 2
    lo, hi = d["ci95_percent"]["neutrophil"]
    assert lo < 75.0 < hi and d["ci95_percent"]["platelet"][0] == 0.0
    assert "95% CI" in format_summary({"differential": d, "review_threshold": 0.9, "n_inputs": 11,
                                          "n_ok": 10, "n_skipped": 1, "n_resumed": 0, "n_computed": 10,
                                          "seconds": 1.0, "images_per_s": 10.0, "backend": "onnx",
                                          "batch_size": 64, "workers": 2, "skipped": [],
                                          "review": {"n_needs_review": 2, "n_low_confidence": 2,
                                                     "n_input_warnings": 0}})
    d2 = differential_count(recs, CLASSES, include_flagged=True)
    assert d2["n_counted"] == 10 and d2["counts"]["neutrophil"] == 8
    assert sum(d2["percent"].values()) == pytest.approx(100.0)


def test_proportion_ci_wilson():
    # textbook values: 50/100 -> 40.4-59.6 %; 5 % of a 100-cell differential -> 2.2-11.2 %
    np.testing.assert_allclose(proportion_ci(50, 100), (0.40383, 0.59617), atol=1e-5)
    np.testing.assert_allclose(proportion_ci(5, 100), (0.02154, 0.11175), atol=1e-5)
    assert proportion_ci(0, 10)[0] == 0.0 and proportion_ci(10, 10)[1] == pytest.approx(1.0)
    assert proportion_ci(0, 0) == (0.0, 0.0)
    # more cells, narrower interval around the same share
    w = [np.subtract(*proportion_ci(n // 5, n)[::-1]) for n in (50, 200, 1000)]
    assert w[0] > w[1] > w[2]


class FakeScreen:
    """Stands in for bloodcell.screen.Screen: flags images with little green (the pure red test image)."""
    image_size = 32

    def __init__(self):
        self.shapes = []

    def score_arrays(self, arrays):
        self.shapes += [a.shape for a in arrays]
        return [{"score": float(a[..., 0].mean() / 255), "n_regions": 1,
                 "multi_cell": bool(a[..., 1].mean() < 60)} for a in arrays]


def test_multi_cell_screen_hook(model_dir, image_dir):
    scr = FakeScreen()
    clf = P.Classifier.load(model_dir, backend="torch", screen=scr)
    red = image_dir / "red.png"
    Image.fromarray(np.full((64, 64, 3), (250, 10, 10), np.uint8)).save(red)
    recs, s = B.predict_paths(clf, [str(image_dir)], progress=False)
    assert all(sh == (32, 32, 3) for sh in scr.shapes) and len(scr.shapes) == 11
    flagged = [r for r in recs if r["multi_cell"]]
    assert [r["path"] for r in flagged] == [str(red)]
    assert all(0 <= r["multi_cell_score"] <= 1 for r in recs)
    assert s["differential"]["n_counted"] == 10 and s["differential"]["n_multi_cell"] == 1


def test_screen_auto_is_optional(monkeypatch, tmp_path):
    monkeypatch.setattr(MF, "BUNDLED_DIR", tmp_path)
    assert P.load_screen("auto") is None  # no bundled screen: just no flag
    (tmp_path / "screen.json").write_text("{not json")
    assert P.load_screen("auto") is None  # a broken one: warn, go on
    assert P.load_screen(None) is None


def test_resume_after_interruption(model_dir, image_dir, tmp_path, monkeypatch):
    out = tmp_path / "res" / "results.csv"
    clf = P.Classifier.load(model_dir, backend="torch", screen=None)
    real = clf.predict_proba_arrays
    seen = []

    def dies_after_two_batches(batch):
        if len(seen) >= 2:
            raise KeyboardInterrupt
        seen.append(len(batch))
        return real(batch)

    monkeypatch.setattr(clf, "predict_proba_arrays", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        B.predict_paths(clf, [str(image_dir)], out=out, batch_size=3, workers=1, progress=False)
    assert not out.exists()  # no half results file
    jp = B.journal_path(out)
    assert jp.exists()
    with open(jp, "a") as f:
        f.write('{"path": "half a line')  # killed mid-write
    # one finished file changes: it must be recomputed, the others not
    changed = image_dir / "sub" / "c00.png"
    Image.fromarray(synthetic_cell(7, seed=99)).save(changed)
    os.utime(changed, ns=(1, 1))

    clf2 = P.Classifier.load(model_dir, backend="torch", screen=None)
    real2, counted = clf2.predict_proba_arrays, []
    monkeypatch.setattr(clf2, "predict_proba_arrays", lambda b: (counted.append(len(b)), real2(b))[1])
    recs, s = B.predict_paths(clf2, [str(image_dir)], out=out, batch_size=3, workers=1, progress=False)
    assert sum(counted) == 10 - sum(seen) + 1 and s["n_resumed"] == sum(seen) - 1
    assert out.exists() and not jp.exists()
    assert all(r["status"] == "ok" for r in recs) and len(recs) == 10
    fresh = P.Classifier.load(model_dir, backend="torch", screen=None).predict(
        sorted(image_dir.rglob("*.png")))
    assert [r["class"] for r in recs] == [r["class"] for r in fresh]
    import csv
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == [r["path"] for r in recs]
    assert [r["class"] for r in rows] == [r["class"] for r in recs]


def test_journal_of_another_model_is_ignored(model_dir, image_dir, tmp_path):
    out = tmp_path / "r.json"
    jp = B.journal_path(out)
    jp.write_text(json.dumps({"journal": 1, "fingerprint": {"weights_sha1": "other"}}) + "\n"
                  + json.dumps({"path": "x", "status": "ok", "class": "platelet",
                                "_key": [str(image_dir / "sub" / "c01.png"), 1, 1]}) + "\n")
    clf = P.Classifier.load(model_dir, backend="torch", screen=None)
    recs, s = B.predict_paths(clf, [str(image_dir)], out=out, progress=False)
    assert s["n_resumed"] == 0 and s["n_computed"] == 10


def test_cli_predict_json_and_csv(model_dir, image_dir, tmp_path, capsys):
    from bloodcell.cli import main
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    out = tmp_path / "o.json"
    rc = main(["predict", str(image_dir), str(tmp_path / "missing.png"), "--model", str(model_dir),
               "--out", str(out), "--backend", "torch", "--no-progress", "--review-threshold", "0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "differential count over 10 image(s)" in text and "images/s" in text
    assert "broken.jpg" in text and "missing.png: no such file" in text
    res = json.loads(out.read_text())
    assert res["summary"]["n_skipped"] == 2 and res["summary"]["review_threshold"] == 0.5
    from bloodcell import __version__
    from bloodcell.modelfile import weights_sha1
    assert res["summary"]["bloodcell_version"] == __version__  # provenance of the results
    assert res["summary"]["model_sha1"] == weights_sha1(model_dir / "model.safetensors")
    assert res["summary"]["created"].endswith("+00:00")
    assert sum(res["summary"]["differential"]["counts"].values()) == 10
    assert len(res["results"]) == 12
    rc = main(["predict", str(image_dir / "sub" / "c01.png"), "--model", str(model_dir),
               "--out", str(tmp_path / "o.csv"), "--backend", "torch", "--no-progress"])
    header = (tmp_path / "o.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["path", "status", "class", "probability", "top3"] and "p_platelet" in header
    assert main(["predict", str(image_dir), "--model", str(model_dir), "--out", str(tmp_path / "o.txt")]) == 2


def test_bundled_screen_adds_flags(model_dir, image_dir):
    clf = P.Classifier.load(model_dir, backend="torch")  # screen="auto": the bundled one
    assert clf.screen is not None
    recs = clf.predict(sorted(image_dir.rglob("*.png"))[:3])
    assert all(isinstance(r["multi_cell"], bool) and isinstance(r["multi_cell_score"], float) for r in recs)
    assert "multi_cell" not in P.Classifier.load(model_dir, backend="torch", screen=None).predict(
        synthetic_cell(0))[0]


# ----------------------------------------------------------------------------- QA findings

def test_links_broken_followed_and_deduplicated(clf, image_dir, tmp_path):
    d = tmp_path / "linked"
    d.mkdir()
    (d / "broken.png").symlink_to(tmp_path / "gone.png")
    (d / "sub_link").symlink_to(image_dir / "sub", target_is_directory=True)  # a linked folder
    (d / "loop").symlink_to(d, target_is_directory=True)                      # a link loop
    (d / "again.png").symlink_to(image_dir / "sub" / "c00.png")               # the same cell twice
    recs, s = B.predict_paths(clf, [str(d), str(image_dir)], progress=False)
    why = {os.path.basename(r["path"]): r["status"] for r in recs}
    assert "broken link" in why["broken.png"]
    assert s["n_ok"] == 10 and len(recs) == 11  # each real file once, the broken link reported


def test_arrays_of_other_types(clf):
    base = synthetic_cell(4, seed=1)
    ref = clf.predict([base])[0]
    as16 = base.astype(np.uint16) * 257  # 16-bit 0..65535
    asfloat = base / 255.0
    got = clf.predict([as16, asfloat, np.full((64, 64, 3), np.nan), np.ones((64, 64, 3), bool)])
    for r in got[:2]:
        assert r["status"] == "ok" and r["class"] == ref["class"]
        assert r["probability"] == pytest.approx(ref["probability"], abs=2e-3)
    assert "NaN" in got[2]["status"] and "dtype bool" in got[3]["status"]


def test_cli_checks_arguments_before_working(model_dir, image_dir, tmp_path, capsys):
    from bloodcell.cli import main
    base = ["predict", str(image_dir), "--model", str(model_dir), "--backend", "torch", "--no-progress"]
    for bad in (["--batch-size", "0"], ["--workers", "-1"], ["--threads", "0"], ["--review-threshold", "2"]):
        with pytest.raises(SystemExit) as e:
            main(base + bad)
        assert e.value.code == 2
    assert "out of range (must be 1 or more)" in capsys.readouterr().err
    (tmp_path / "res.csv").mkdir()
    assert main(base + ["--out", str(tmp_path / "res.csv")]) == 2
    assert main(base + ["--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "needs --backend onnx" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--model", str(model_dir), "--backend", "torch"]) == 1
    assert "no image files found in" in capsys.readouterr().err


def test_summary_says_why_images_need_review(clf, image_dir):
    gray = image_dir / "gray.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(gray)
    clf.review_threshold = 0.999999  # every image is below it
    recs, s = B.predict_paths(clf, [str(image_dir)], progress=False)
    text = format_summary(s)
    assert s["review"] == {"n_needs_review": 11, "n_low_confidence": 11, "n_input_warnings": 1}
    assert "needs review: 11 of 11 classified" in text and "1 with input warnings" in text


def test_damaged_model_files_are_named(model_dir, tmp_path):
    import shutil
    from bloodcell.models import load_model
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_model(bad)
    shutil.copy(model_dir / "model.safetensors", bad / "model.safetensors")
    meta = json.loads((bad / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**meta, "architecture": "cnn"}))
    with pytest.raises(ValueError, match="do not fit the architecture 'cnn'"):
        load_model(bad)
    (bad / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json: not valid JSON"):
        load_model(bad)


def test_damaged_onnx_file_is_named(model_dir, tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_text('{"not": "onnx"}')
    with pytest.raises(ValueError, match="bogus.onnx: not a usable ONNX model"):
        P.Classifier.load(model_dir, backend="onnx", onnx_path=bogus, screen=None)


def test_white_cell_differential():
    counts = {"basophil": 1, "eosinophil": 3, "erythroblast": 5, "ig": 0, "lymphocyte": 30,
              "monocyte": 6, "neutrophil": 60, "platelet": 40}
    w = leukocyte_differential(counts)
    assert w["n_white"] == 100 and w["percent"]["neutrophil"] == pytest.approx(60.0)
    assert sum(w["percent"].values()) == pytest.approx(100.0) and "platelet" not in w["percent"]
    assert w["nrbc_per_100_wbc"] == pytest.approx(5.0) and w["n_platelet"] == 40
    lo, hi = w["ci95_percent"]["monocyte"]
    assert lo < 6.0 < hi
    assert leukocyte_differential({"cat": 3, "dog": 4}) is None  # a model of other classes
    recs = [{"status": "ok", "class": c, "needs_review": False} for c, k in counts.items() for _ in range(k)]
    d = differential_count(recs, CLASSES)
    assert d["white_cells"] == w
    text = format_summary({"differential": d, "review_threshold": 0.9, "n_inputs": 145, "n_ok": 145,
                             "n_skipped": 0, "n_resumed": 0, "n_computed": 145, "seconds": 1.0,
                             "images_per_s": 145.0, "backend": "onnx", "batch_size": 64, "workers": 2,
                             "skipped": [], "review": {"n_needs_review": 0, "n_low_confidence": 0,
                                                       "n_input_warnings": 0}})
    assert "5.0 per 100 white cells (NRBC)" in text and "white cells: 100; platelets (40)" in text


def test_listing_escapes_control_characters(capsys):
    print_records([{"path": "a\tb\nc.png", "status": "skipped: not an image"}])
    out = capsys.readouterr().out
    assert out == "a\\tb\\nc.png\tskipped: not an image\n"


# ----------------------------------------------------------------------------- issue 16

def test_csv_output_defuses_formula_file_names(clf, tmp_path, monkeypatch):
    """Files named like spreadsheet formulas are written as text (the lab page's CSV
    export uses the same guard)."""
    d = tmp_path / "formulas"
    d.mkdir()
    names = ['=HYPERLINK("http:x","click").jpg', "+cmd.jpg", "-2+3.jpg", "@SUM(A1).jpg", "ok.png"]
    for k, n in enumerate(names):
        Image.fromarray(synthetic_cell(k, seed=k)).save(d / n, "PNG")
    monkeypatch.chdir(d)  # `bloodcell predict .` lists the names as they are
    out = tmp_path / "r.csv"
    recs, _ = B.predict_paths(clf, ["."], out=out, progress=False)
    assert all(r["status"] == "ok" for r in recs) and {r["path"] for r in recs} == set(names)
    import csv
    rows = list(csv.DictReader(open(out, newline="")))
    paths = {r["path"] for r in rows}
    assert paths == {"'" + n for n in names[:4]} | {"ok.png"}
    assert not any(r["path"][:1] in "=+-@" for r in rows)


def test_unwritable_out_file_refused_before_work(clf, image_dir, tmp_path, monkeypatch, capsys):
    """An existing --out file that cannot be replaced: a clear error before any image is
    classified (it used to fail after the last image with a raw [Errno 1])."""
    import shutil
    import subprocess
    out = tmp_path / "locked.csv"
    out.write_text("old results\n")
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(out)],
                                                    capture_output=True).returncode:
        out.chmod(0o444)
        if os.access(out, os.W_OK):
            pytest.skip("cannot make a file unwritable here (root without chattr +i)")
    try:
        calls = []
        monkeypatch.setattr(P.Classifier, "predict_proba_arrays",
                            lambda self, b: calls.append(len(b)) or np.full((len(b), 8), 1 / 8))
        from bloodcell.cli import main
        rc = main(["predict", str(image_dir), "--model", str(clf.weights_path.parent),
                   "--backend", "torch", "--no-progress", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and calls == []  # refused before the model ran
        assert str(out) in err and "cannot be replaced" in err and "Errno" not in err
        assert len(err.strip().splitlines()) == 1
        assert out.read_text() == "old results\n"
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
        out.chmod(0o644)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_model_input_contract(model_dir, backend):
    """A float batch in 0..1 used to be cast to uint8 (all 0s and 1s) and classified."""
    clf = P.Classifier.load(model_dir, backend=backend, screen=None)
    x = np.stack([synthetic_cell(k) for k in range(2)])
    assert clf.predict_logits_arrays(x[:, ::-1]).shape == (2, len(CLASSES))  # a view is fine
    with pytest.raises(ValueError, match=r"uint8 images \[N, 64, 64, 3\].*got dtype float32: scale"):
        clf.predict_proba_arrays(x.astype(np.float32) / 255)
    for bad in (x[:, :32, :32], x[0], np.concatenate([x, x[..., :1]], axis=3)):
        with pytest.raises(ValueError, match=rf"got shape \[{', '.join(map(str, bad.shape))}\]"):
            clf.predict_logits_arrays(bad)


def test_onnx_path_does_not_import_torch(tmp_path):
    """`bloodcell predict` on ONNX Runtime runs without PyTorch (start-up time and memory):
    the bundled int8 file needs no export, so the whole command stays torch-free; nor does
    it load what other commands need (the report's plotting and scikit-learn, the onnx
    package: the file's metadata comes from the ONNX Runtime session, scipy.spatial)."""
    import subprocess
    import sys
    if not (MF.BUNDLED_DIR / "model.int8.onnx").exists():
        pytest.skip("no int8 file bundled")
    code = ("import sys; from bloodcell.cli import main; "
            f"rc = main(['predict', {str(P.example_files()[0])!r}, '--backend', 'onnx-int8', "
            f"'--out', {str(tmp_path / 'r.csv')!r}, '--no-progress']); "
            "print([m for m in ('torch', 'onnx', 'sklearn', 'matplotlib', 'pandas', 'scipy.spatial') "
            "if m in sys.modules], rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[] 0", out.stderr[-2000:]


def test_review_views_flag_an_image_any_view_is_unsure_of(model_dir, tmp_path):
    """review_views=4: the answer is the first view's; the review probability is the lowest
    probability of that class over the image, its two flips and its 180-degree turn (only
    for images the first view leaves unflagged); the flag and the summary's counts use it."""
    from conftest import synthetic_cell

    from bloodcell.differential import review_counts
    imgs = [synthetic_cell(i % 8, 64, seed=i) for i in range(24)]
    one = P.Classifier.load(model_dir, backend="torch", screen=None)
    four = P.Classifier.load(model_dir, backend="torch", screen=None, review_views=4)
    x = np.stack([one.preprocess(im) for im in imgs])
    views = [one.predict_proba_arrays(np.ascontiguousarray(v))
             for v in (x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1])]
    thr = float(np.quantile(views[0].max(1), 0.3))  # the first view flags 30 %
    one.review_threshold = four.review_threshold = thr
    r1, r4 = one.predict(imgs), four.predict(imgs)
    assert [a["class"] for a in r1] == [b["class"] for b in r4]  # the answer does not change
    for i, (a, b) in enumerate(zip(r1, r4)):
        k = one.classes.index(a["class"])
        want = min(v[i, k] for v in views) if a["probability"] >= thr else a["probability"]
        assert b["review_probability"] == pytest.approx(want, abs=1e-5)
        assert b["needs_review"] == (b["review_probability"] < thr) and not b["input_warnings"]
    assert sum(b["needs_review"] for b in r4) > sum(a["needs_review"] for a in r1)  # views disagree here
    assert review_counts(r4, thr)["n_low_confidence"] == sum(b["needs_review"] for b in r4)
    assert four.fingerprint() != one.fingerprint()  # a resumed run does not mix the two
    with pytest.raises(ValueError, match="review_views 2"):
        P.Classifier.load(model_dir, backend="torch", screen=None, review_views=2)
