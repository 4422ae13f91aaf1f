"""ONNX export and the ONNX Runtime backend: same classes as PyTorch."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import CLASSES, synthetic_cell

from bloodcell import modelfile as MF
from bloodcell import export as E
from bloodcell import predict as P
from test_predict import make_model

@pytest.fixture
def model_dir(tmp_path):
    return make_model(tmp_path / "model", gain=200.0)


def test_export_cli_checked_dynamic_batch(model_dir, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    from bloodcell.cli import main
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "same classes True" in capsys.readouterr().out
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bloodcell_image_size"] == "64" and "basophil" in meta["bloodcell_classes"]
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # the batch axis is dynamic
        x = np.zeros((n, 64, 64, 3), np.uint8)
        assert s.run(None, {E.INPUT_NAME: x})[0].shape == (n, len(CLASSES))
    with pytest.raises(ValueError, match="opset"):
        E.export(model_dir, out=tmp_path / "old.onnx", opset=13)


def test_torch_and_onnx_agree_on_synthetic_images(model_dir):
    t = P.Classifier.load(model_dir, backend="torch", screen=None)
    o = P.Classifier.load(model_dir, backend="onnx", screen=None)
    imgs = [synthetic_cell(k % 8, seed=k) for k in range(24)]
    rt, ro = t.predict(imgs), o.predict(imgs, batch_size=7)
    assert len({r["class"] for r in rt}) > 1
    assert [r["class"] for r in rt] == [r["class"] for r in ro]
    pt = np.array([list(r["probabilities"].values()) for r in rt])
    po = np.array([list(r["probabilities"].values()) for r in ro])
    assert np.abs(pt - po).max() < 1e-4


def test_onnx_cache_reused_and_refreshed(model_dir):
    o = P.Classifier.load(model_dir, backend="onnx", screen=None)
    assert o.onnx_path == model_dir / "model.onnx"
    stamp = os.stat(o.onnx_path).st_mtime_ns
    P.Classifier.load(model_dir, backend="onnx", screen=None)
    assert os.stat(o.onnx_path).st_mtime_ns == stamp  # not exported again
    make_model(model_dir, seed=1, gain=200.0)  # new weights in the same folder
    o2 = P.Classifier.load(model_dir, backend="onnx", screen=None)
    t2 = P.Classifier.load(model_dir, backend="torch", screen=None)
    assert E.onnx_metadata(o2.onnx_path)["bloodcell_weights_sha1"] == MF.weights_sha1(model_dir / "model.safetensors")
    x = np.stack([synthetic_cell(k) for k in range(8)])
    assert np.abs(o2.predict_proba_arrays(x) - t2.predict_proba_arrays(x)).max() < 1e-4


def test_cached_export_opened_once(model_dir, monkeypatch):
    """The cached file's metadata is read from the session that then runs it: one ONNX
    Runtime session per Classifier, and a stale file re-exported in place is not run."""
    P.Classifier.load(model_dir, backend="onnx", screen=None)  # makes the cached export
    opened = []
    real = P.ort_session
    monkeypatch.setattr(P, "ort_session", lambda path, threads: opened.append(path) or real(path, threads))
    P.Classifier.load(model_dir, backend="onnx", screen=None)
    assert opened == [model_dir / "model.onnx"]
    make_model(model_dir, seed=1, gain=200.0)  # new weights: the stale export is redone
    opened.clear()
    o = P.Classifier.load(model_dir, backend="onnx", screen=None)
    assert len(opened) == 2 and E.onnx_metadata(o.onnx_path)["bloodcell_weights_sha1"] \
        == o.runner.session.get_modelmeta().custom_metadata_map["bloodcell_weights_sha1"] \
        == MF.weights_sha1(model_dir / "model.safetensors")


def test_temperature_applied_by_onnx_backend(model_dir):
    import json
    j = model_dir / "model.json"
    meta = json.loads(j.read_text())
    x = np.stack([synthetic_cell(k) for k in range(8)])
    p1 = P.Classifier.load(model_dir, backend="onnx", screen=None).predict_proba_arrays(x)
    j.write_text(json.dumps({**meta, "temperature": 3.0}))
    p3 = P.Classifier.load(model_dir, backend="onnx", screen=None).predict_proba_arrays(x)
    assert (p1.argmax(1) == p3.argmax(1)).all() and p3.max(1).mean() < p1.max(1).mean()


@pytest.mark.realdata
def test_torch_and_onnx_same_classes_on_real_test_images(real_data, tmp_path):
    """A small real subset through both backends, with the bundled model."""
    model = MF.BUNDLED_DIR / "model.json"
    files = []
    for d in sorted(p for p in real_data.iterdir() if p.is_dir()):
        files += sorted(f for f in d.glob("*.jpg") if not f.name.startswith("."))[:6]
    t = P.Classifier.load(model, backend="torch", screen=None)
    o = P.Classifier.load(model, backend="onnx", onnx_path=E.export(model, out=tmp_path / "m.onnx"),
                          screen=None)
    rt, ro = t.predict(files), o.predict(files)
    assert all(r["status"] == "ok" for r in rt)
    assert [r["class"] for r in rt] == [r["class"] for r in ro]
    pt = np.array([r["probability"] for r in rt])
    po = np.array([r["probability"] for r in ro])
    assert np.abs(pt - po).max() < 1e-3


def test_int8_quantisation_runs_and_mostly_agrees(model_dir, tmp_path):
    fp32 = E.export(model_dir, out=tmp_path / "m.onnx")
    calib = np.stack([synthetic_cell(k % 8, seed=100 + k) for k in range(32)])
    q = E.quantize_int8(fp32, tmp_path / "m.int8.onnx", calib)
    import onnx
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(q)).graph.node)
    x = np.stack([synthetic_cell(k % 8, seed=k) for k in range(24)])
    p32 = P.Classifier.load(model_dir, backend="onnx", onnx_path=fp32, screen=None).predict_proba_arrays(x)
    p8 = P.Classifier.load(model_dir, backend="onnx", onnx_path=q, screen=None).predict_proba_arrays(x)
    assert p8.shape == p32.shape and np.allclose(p8.sum(1), 1, atol=1e-5)
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.75


def test_int8_backend_finds_its_file_and_refuses_stale_ones(model_dir, tmp_path):
    from bloodcell.modelfile import resolve_model_path
    weights, _ = resolve_model_path(model_dir)
    with pytest.raises(FileNotFoundError, match="export --format onnx-int8"):
        P.Classifier.load(model_dir, backend="onnx-int8", screen=None)
    fp32 = E.export(model_dir, out=tmp_path / "m.onnx")
    calib = np.stack([synthetic_cell(k % 8, seed=100 + k) for k in range(16)])
    q = E.quantize_int8(fp32, E.default_int8_path(weights), calib)
    # the quantised file keeps the float export's provenance
    assert E.onnx_metadata(q)["bloodcell_weights_sha1"] == MF.weights_sha1(weights)
    clf = P.Classifier.load(model_dir, backend="onnx-int8", screen=None)
    assert clf.onnx_path == q
    rec = clf.predict([synthetic_cell(2, seed=5)])[0]
    assert rec["status"] == "ok" and abs(sum(rec["probabilities"].values()) - 1) < 1e-5
    other = make_model(tmp_path / "other", gain=3.0)
    ow, _ = resolve_model_path(other)
    E.default_int8_path(ow).write_bytes(q.read_bytes())  # an int8 file of other weights
    with pytest.raises(ValueError, match="other weights"):
        P.Classifier.load(other, backend="onnx-int8", screen=None)


def test_auto_backend_runs_the_int8_file_only_where_it_is_exact(model_dir, tmp_path, monkeypatch, caplog):
    """--backend auto (predict's and serve's default): the int8 file next to the weights
    when it was made from them with 8-bit weights and the CPU has an int8 dot product
    (VNNI/AMX), else the float ONNX model; a 7-bit, stale or damaged file is not used."""
    from bloodcell import cpu
    from bloodcell.modelfile import resolve_model_path
    weights, _ = resolve_model_path(model_dir)
    assert P.Classifier.load(model_dir, backend="auto", screen=None).backend == "onnx"  # no int8 file
    fp32 = E.export(model_dir, out=tmp_path / "m.onnx")
    calib = np.stack([synthetic_cell(k % 8, seed=100 + k) for k in range(16)])
    q8 = E.quantize_int8(fp32, E.default_int8_path(weights), calib)
    meta = E.onnx_metadata(q8)
    assert meta["bloodcell_int8_weight_bits"] == "8" and meta["bloodcell_int8_float_nodes"] == "stem,head"
    assert meta["bloodcell_int8_calibration_images"] == "16"

    monkeypatch.setattr(cpu, "has_int8_dot", lambda: True)
    clf = P.Classifier.load(model_dir, backend="auto", screen=None)
    assert (clf.backend, clf.onnx_path) == ("onnx-int8", q8)
    assert clf.fingerprint()["backend"] == "onnx-int8"  # a resumed job never mixes engines
    # an int8 file named with --onnx is labelled as what it is
    assert P.Classifier.load(model_dir, backend="auto", onnx_path=q8, screen=None).backend == "onnx-int8"
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: False)
    with caplog.at_level("INFO", logger="bloodcell"):
        clf = P.Classifier.load(model_dir, backend="auto", screen=None)
    assert clf.backend == "onnx" and clf.onnx_path != q8
    assert "no int8 dot product" in caplog.text  # says why the float model runs
    with caplog.at_level("WARNING", logger="bloodcell"):  # asked for: runs, but says why it may be off
        assert P.Classifier.load(model_dir, backend="onnx-int8", screen=None).onnx_path == q8
    assert "can saturate" in caplog.text

    monkeypatch.setattr(cpu, "has_int8_dot", lambda: True)
    q7 = E.quantize_int8(fp32, E.default_int8_path(weights), calib, weight_bits=7)
    assert E.onnx_metadata(q7)["bloodcell_int8_weight_bits"] == "7"
    caplog.clear()
    with caplog.at_level("INFO", logger="bloodcell"):
        assert P.Classifier.load(model_dir, backend="auto", screen=None).backend == "onnx"
    assert "7-bit" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="bloodcell"):
        assert P.Classifier.load(model_dir, backend="onnx-int8", screen=None).onnx_path == q7
    assert "saturate" not in caplog.text  # 7-bit weights are exact on any CPU

    other = make_model(tmp_path / "other", gain=3.0)  # an int8 file made from other weights
    E.default_int8_path(resolve_model_path(other)[0]).write_bytes(q8.read_bytes())
    caplog.clear()
    with caplog.at_level("INFO", logger="bloodcell"):
        assert P.Classifier.load(other, backend="auto", screen=None).backend == "onnx"
    assert "other weights" in caplog.text
    E.default_int8_path(weights).write_bytes(b"not an onnx file")
    with caplog.at_level("WARNING", logger="bloodcell"):
        assert P.Classifier.load(model_dir, backend="auto", screen=None).backend == "onnx"
    assert "model.int8.onnx not used" in caplog.text
    with pytest.raises(ValueError, match="7 or 8"):
        E.quantize_int8(fp32, tmp_path / "x.onnx", calib, weight_bits=4)


def test_an_onnx_file_of_another_input_size_is_refused_at_load(model_dir, tmp_path):
    """--onnx naming another model's file: a clear error when the model loads, not an
    ONNX Runtime error halfway through a job."""
    small = make_model(tmp_path / "small", size=32)
    other = E.export(small, out=tmp_path / "small.onnx")
    with pytest.raises(ValueError, match=r"takes input .*32.* not this model's \[N, 64, 64, 3\]"):
        P.Classifier.load(model_dir, backend="onnx", onnx_path=other, screen=None)


def test_export_int8_cli_calibrated_on_training_images_only(synthetic_dataset, tmp_path, capsys):
    """`bloodcell export --format onnx-int8`: the quantised file lands next to the weights,
    keeps their provenance, runs as --backend onnx-int8 and leaves no float copy behind;
    its calibration images are training-split images of the model's run, never val/test."""
    import onnx

    from bloodcell import data as D
    from bloodcell.cli import main
    model = make_model(tmp_path / "model", gain=200.0)
    ds = D.scan(synthetic_dataset)
    images, _ = D.load_images(ds, 64, progress=False)
    splits = D.make_split(ds, seed=3)  # the run's own split (not the default seed's)
    D.write_manifest(model / "split.csv", ds, splits)

    calib = E.train_images(model, synthetic_dataset, n=1000)
    key = {s: {np.asarray(images[i]).tobytes() for i in D.split_indices(splits, s)} for s in D.SPLITS}
    assert {x.tobytes() for x in calib} == key["train"]  # n > the split: all of it, nothing else
    assert len(E.train_images(model, synthetic_dataset, n=10)) == 10

    assert main(["export", "--model", str(model), "--format", "onnx-int8", "--data", str(synthetic_dataset),
                 "--calib-images", "24"]) == 0
    assert "same classes" in capsys.readouterr().out
    q = model / "model.int8.onnx"
    assert sorted(f.name for f in model.glob("*.onnx")) == ["model.int8.onnx"]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(q)).graph.node)
    assert E.onnx_metadata(q)["bloodcell_weights_sha1"] == MF.weights_sha1(model / "model.safetensors")
    clf = P.Classifier.load(model, backend="onnx-int8", screen=None)
    assert clf.onnx_path == q
    x = np.stack([synthetic_cell(k % 8, seed=k) for k in range(16)])
    ref = P.Classifier.load(model, backend="torch", screen=None).predict_proba_arrays(x)
    assert (clf.predict_proba_arrays(x).argmax(1) == ref.argmax(1)).mean() >= 0.75
