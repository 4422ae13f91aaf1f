"""The other-labs fallback: images whose colours the main model's input check calls
unlike its training images are classified by a second model (its own preprocessing),
in `Classifier.predict`, the CSV and the lab page alike; the rest keep the main model."""
from __future__ import annotations

import csv
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES
from test_inputcheck import stained
from test_predict import make_model

from bloodcell import batch as B
from bloodcell.cli.predict import format_summary
from bloodcell import modelfile as MF
from bloodcell import predict as P
from bloodcell.inputcheck import fit_input_check
from bloodcell.modelfile import ModelFile
from bloodcell.transforms import prepare


def _with_check(run, framing=None):
    """Give a saved model colour statistics fitted on `stained` images (and a framing)."""
    j = run / "model.json"
    meta = ModelFile.load(j)
    pre = dict(meta.preprocess or {})
    if framing is not None:
        pre["framing"] = framing
    meta.input_check = fit_input_check(stained(300))
    meta.preprocess = pre
    meta.save(j)
    return run


@pytest.fixture
def pair(tmp_path):
    main = _with_check(make_model(tmp_path / "main", seed=0))
    other = _with_check(make_model(tmp_path / "other", seed=1), framing={"power": 0.5})
    return main, other


@pytest.fixture
def inputs():
    pbc_like = list(stained(6, seed=5))
    foreign = [a[..., ::-1].copy() for a in stained(4, seed=6)]  # another stain: channels swapped
    return pbc_like + foreign


def test_unlike_images_go_to_the_fallback(pair, inputs):
    main, other = pair
    clf = P.Classifier.load(main, screen=None, fallback=other)
    alone = P.Classifier.load(main, screen=None)
    fb = P.Classifier.load(other, screen=None)
    assert clf.fallback is not None and fb.framing is not None
    recs = clf.predict(inputs, batch_size=3)
    assert [r["model"] for r in recs] == ["main"] * 6 + ["other-labs"] * 4
    for r, own in zip(recs[:6], alone.predict(inputs[:6])):
        assert r["probabilities"] == pytest.approx(own["probabilities"], abs=1e-6)
        assert "model" not in own  # no fallback: records as before
    for r, x in zip(recs[6:], inputs[6:]):
        # the fallback's own preprocessing (its framing), its own model and temperature
        want = fb.predict_proba_arrays(prepare(x, fb.image_size, fb.framing).image[None])[0]
        assert list(r["probabilities"].values()) == pytest.approx(want.tolist(), abs=1e-6)
        assert r["needs_review"] and any("colours unlike" in w for w in r["input_warnings"])
        assert "cell_located" in r  # the fallback frames cells: its record says whether it found one
    routed = [r["class"] for r in recs[6:]]
    mains = [r["class"] for r in alone.predict(inputs[6:])]
    assert routed != mains  # two different random models: the answers are the fallback's


def test_predict_proba_and_answering_route_like_predict(pair, inputs):
    main, other = pair
    clf = P.Classifier.load(main, screen=None, fallback=other)
    recs = clf.predict(inputs)
    proba = clf.predict_proba(inputs)
    want = np.array([[r["probabilities"][c] for c in CLASSES] for r in recs])
    np.testing.assert_allclose(proba, want, atol=1e-6)
    who, arr = clf.answering(inputs[-1])  # what the lab page's Grad-CAM explains
    assert who is clf.fallback and arr.shape == (who.image_size, who.image_size, 3)
    assert clf.answering(inputs[0])[0] is clf
    with pytest.raises(ValueError, match="input 0"):
        clf.predict_proba([b"not an image"])


def test_review_counts_use_the_answering_models_threshold(pair, inputs):
    main, other = pair
    clf = P.Classifier.load(main, screen=None, fallback=other)
    clf.review_threshold, clf.fallback.review_threshold = 0.0, 1.0  # main never low, fallback always
    recs = clf.predict(inputs)
    from bloodcell.differential import review_counts
    r = review_counts(recs, clf.review_threshold, clf.fallback.review_threshold)
    assert r["n_low_confidence"] == 4 and r["n_input_warnings"] == 4 and r["n_needs_review"] == 4


def _folder_and_pair(pair, inputs, tmp_path):
    """The inputs as PNG files in one folder, and the main model with its fallback."""
    main, other = pair
    d = tmp_path / "imgs"
    d.mkdir()
    for i, a in enumerate(inputs):
        Image.fromarray(a).save(d / f"c{i:02d}.png")
    return d, P.Classifier.load(main, screen=None, fallback=other)


def test_summary_counts_low_confidence_per_models_threshold(pair, inputs, tmp_path):
    """The printed summary names each threshold with the images it flagged (a total
    under the main threshold alone would count routed images it did not judge)."""
    d, clf = _folder_and_pair(pair, inputs, tmp_path)
    clf.review_threshold, clf.fallback.review_threshold = 0.0, 1.0  # main never low, fallback always
    _, s = B.predict_paths(clf, [str(d)], progress=False)
    assert s["other_labs_review_threshold"] == 1.0 and s["review"]["n_low_confidence_other_labs"] == 4
    assert "0 with confidence < 0 (main model) and 4 < 1 (other-labs model)" in format_summary(s)
    # a run with nothing classified keeps the columns of the run it would have been
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not an image")
    for folder in ("empty", "bad"):
        out = tmp_path / f"{folder}.csv"
        B.predict_paths(clf, [str(tmp_path / folder)], out, progress=False)
        assert out.read_text().splitlines()[0].endswith(",model"), folder


def test_fallback_is_refused_when_it_cannot_route(tmp_path, pair):
    main, other = pair
    bare = make_model(tmp_path / "bare", seed=2)  # no colour statistics: nothing to route on
    with pytest.raises(ValueError, match="colour statistics"):
        P.Classifier.load(bare, screen=None, fallback=other)
    meta = ModelFile.load(other / "model.json")
    meta.classes = list(reversed(CLASSES))
    meta.save(other / "model.json")
    with pytest.raises(ValueError, match=f"other-labs model {other}.*classes"):
        P.Classifier.load(main, screen=None, fallback=other)
    clf = P.Classifier.load(main, screen=None)
    with pytest.raises(TypeError, match="a Classifier"):
        P.Classifier(clf.model, clf.meta, fallback=str(other))


def test_cli_option_values():
    from bloodcell.cli.args import fallback_arg
    assert fallback_arg("AUTO") == "auto" and fallback_arg("None") is None and fallback_arg("runs/x") == "runs/x"


def test_a_bad_model_path_is_named_with_its_option(pair, tmp_path, capsys, monkeypatch):
    """With --model and --other-labs-model both given, the error says which one is wrong,
    with the path as typed, the same words in predict and serve."""
    import uvicorn

    from bloodcell.cli import main as cli
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("server started"))
    model, _ = pair
    img = tmp_path / "cell.png"
    Image.fromarray(stained(1)[0]).save(img)
    not_model = tmp_path / "notes.txt"
    not_model.write_text("x")
    for cmd in (["predict", str(img), "--no-screen"], ["serve", "--no-screen", "--db", str(tmp_path / "l.db")]):
        for bad in (str(not_model), str(tmp_path / "missing"), ""):
            assert cli([*cmd, "--model", str(model), "--other-labs-model", bad]) == 2
            err = capsys.readouterr().err
            assert f"--other-labs-model {bad or chr(39) * 2}" in err and "--model " + str(model) not in err, err
        assert cli([*cmd, "--model", str(tmp_path / "missing"), "--other-labs-model", str(model)]) == 2
        err = capsys.readouterr().err
        assert f"--model {tmp_path / 'missing'}: not a model (no such file or folder)" in err, err
    assert not (tmp_path / "l.db").exists()  # refused before the lab's database is made


def test_bundled_fallback_is_auto_for_the_bundled_model_only(pair, monkeypatch, tmp_path, caplog):
    main, other = pair
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in main.glob("model.*"):
        (bundle / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(MF, "BUNDLED_DIR", bundle)
    assert P.Classifier.load(screen=None).fallback is None  # no other-labs folder: none
    (bundle / P.FALLBACK_DIR).mkdir()
    for f in other.glob("model.*"):
        (bundle / P.FALLBACK_DIR / f.name).write_bytes(f.read_bytes())
    assert P.Classifier.load(screen=None).fallback is not None
    assert P.Classifier.load(screen=None, fallback=None).fallback is None
    assert P.Classifier.load(main, screen=None).fallback is None  # a named model: no bundled fallback
    # a broken bundled other-labs model never blocks the bundled model: a warning, no fallback
    meta = ModelFile.load(bundle / P.FALLBACK_DIR / "model.json")
    meta.classes = list(reversed(CLASSES))
    meta.save(bundle / P.FALLBACK_DIR / "model.json")
    with caplog.at_level("WARNING", logger="bloodcell"):
        assert P.Classifier.load(screen=None).fallback is None
    assert "other-labs model was not loaded" in caplog.text
    (bundle / P.FALLBACK_DIR / "model.safetensors").unlink()
    assert P.Classifier.load(screen=None).fallback is None
    with pytest.raises(FileNotFoundError):  # asked for by name: an error
        P.Classifier.load(screen=None, fallback=bundle / P.FALLBACK_DIR)


def test_csv_and_journal_say_which_model(pair, inputs, tmp_path):
    main, other = pair
    d, clf = _folder_and_pair(pair, inputs, tmp_path)
    out = tmp_path / "res.csv"
    _, summary = B.predict_paths(clf, [str(d)], out, progress=False)
    assert summary["n_other_labs"] == 4 and summary["other_labs_model"].startswith(str(other))
    assert "4 image(s) with colours unlike the training images were classified by the other-labs" \
        in format_summary(summary)
    rows = list(csv.DictReader(out.open(newline="")))
    assert list(rows[0])[-1] == "model"  # last: the other columns keep their places
    assert [r["model"] for r in rows] == ["main"] * 6 + ["other-labs"] * 4
    # another fallback model changes the records: the journal's fingerprint says so
    assert clf.fingerprint()["fallback"] != P.Classifier.load(main, screen=None).fingerprint().get("fallback")


@pytest.mark.parametrize("views", [1, 4])
def test_lab_page_routes_like_predict(pair, inputs, views):
    from bloodcell.serve.app import model_card
    from bloodcell.serve.cells import new_cell, prepare_cells
    from bloodcell.serve.worker import ModelWorker
    main, other = pair
    clf = P.Classifier.load(main, screen=None, fallback=other, review_views=views)
    datas = []
    for a in inputs:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        datas.append(buf.getvalue())
    cells = prepare_cells(clf, datas, [f"c{i}.png" for i in range(len(datas))], [None] * len(datas))
    w = ModelWorker(clf)
    try:
        probs, review = w.predict([c.arrays for c in cells]).result(30)
    finally:
        w.close()
    assert (review is None) == (views == 1)
    card = model_card(clf, main)
    assert card["review_views"] == views
    new = [new_cell(clf, c, p, "s", card, "t", None if review is None else r)
           for c, p, r in zip(cells, probs, [None] * len(cells) if review is None else review)]
    res = [r for _, r in new]
    versions = [row["model_version"] for row, _ in new]
    assert versions == [card["version"]] * 6 + [f"other-labs:{card['other_labs_model']['version']}"] * 4
    assert card["other_labs_model"]["version"] != card["version"]
    ref = clf.predict(datas)
    assert [r["model"] for r in res] == [r["model"] for r in ref] == ["main"] * 6 + ["other-labs"] * 4
    for r, q in zip(res, ref):
        assert r["class"] == q["class"] and r["probability"] == pytest.approx(q["probability"], abs=1e-6)
        assert r["needs_review"] == q["needs_review"]  # the same review decision, views or not
    assert json.dumps(res)  # JSON-ready for the API
    assert np.isfinite(probs).all()


def test_lab_page_stores_and_explains_the_answering_model(pair, inputs, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from bloodcell import saliency
    from bloodcell.serve import create_app
    main, other = pair
    seen = []
    real = saliency.gradcam
    monkeypatch.setattr(saliency, "gradcam", lambda model, arr, idx: seen.append((model, arr.shape)) or
                        real(model, arr, idx))
    files = []
    for i, a in enumerate(inputs):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        files.append(("files", (f"c{i}.png", buf.getvalue(), "image/png")))
    app = create_app(model=str(main), other_labs_model=str(other), db_path=tmp_path / "lab.db", screen=None)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert "other_labs_model" in c.get("/api/model").json()
        res = c.post("/api/predict", files=files).json()
        assert [r["model"] for r in res["results"]] == ["main"] * 6 + ["other-labs"] * 4
        cells = c.get(f"/api/samples/{res['sample_id']}").json()["cells"]
        assert [x.get("model", "main") for x in cells] == ["main"] * 6 + ["other-labs"] * 4
        # the lab's exports say it too, as predict's CSV does
        sid = res["sample_id"]
        rows = list(csv.DictReader(io.StringIO(c.get(f"/api/samples/{sid}/export.csv").text)))
        by_id = {r["cell_id"]: r["model"] for r in rows}
        assert [by_id[r["cell_id"]] for r in res["results"]] == ["main"] * 6 + ["other-labs"] * 4
        assert all(r["model_version"].startswith("other-labs:") == (r["model"] == "other-labs") for r in rows)
        with zipfile.ZipFile(io.BytesIO(c.get(f"/api/samples/{sid}/export.zip").content)) as z:
            labels = list(csv.DictReader(io.StringIO(z.read("labels.csv").decode())))
        assert sorted(r["model"] for r in labels) == ["main"] * 6 + ["other-labs"] * 4
        for i in (0, 9):  # Grad-CAM runs on the model that answered, on its own input
            assert c.get(f"/api/cells/{res['results'][i]['cell_id']}/saliency").status_code == 200
    assert len(seen) == 2 and seen[0][0] is not seen[1][0]  # the main model, then the fallback


def test_shipped_other_labs_model_takes_restained_pbc_cells(real_data):
    """The shipped pair on real cells: PBC images stay with the bundled model; the same
    cells with a yellow background (another lab's stain, as benchmarks/shift_eval.py
    makes it) go to the other-labs model, which reads them (row 41: 0.975 of 240)."""
    if P.bundled_fallback_path() is None:
        pytest.skip("this installation ships no other-labs model")
    clf = P.Classifier.load(screen=None)
    assert clf.fallback is not None and clf.fallback.framing is not None
    files = [(c, sorted((real_data / c).glob("*.jpg"))[5]) for c in CLASSES if c != "platelet"]
    plain = [np.asarray(Image.open(f).convert("RGB")) for _, f in files]
    od = [-np.log((a.astype(np.float32) + 1) / 256) * np.float32([0.9, 1.0, 1.3]) + np.float32([0, 0.02, 0.12])
          for a in plain]
    yellow = [np.clip(np.exp(-x) * 256 - 1, 0, 255).astype(np.uint8) for x in od]
    recs = clf.predict(plain + yellow)
    assert [r["model"] for r in recs] == ["main"] * 7 + ["other-labs"] * 7
    assert sum(r["class"] == c for r, (c, _) in zip(recs[7:], files)) >= 6
    assert all(r["needs_review"] for r in recs[7:])


def test_float_onnx_of_the_shipped_pair_is_cached_outside_the_package():
    """An installed package is read-only: the other-labs model's float ONNX export goes
    to the user cache, like the bundled model's."""
    if P.bundled_fallback_path() is None:
        pytest.skip("this installation ships no other-labs model")
    clf = P.Classifier.load(backend="onnx", screen=None)
    assert MF.BUNDLED_DIR not in clf.fallback.onnx_path.resolve().parents
    assert not (P.bundled_fallback_path() / "model.onnx").exists()
