"""The lab page's HTTP API (FastAPI TestClient): every endpoint, bad inputs,
persistence across a restart, the multi-cell hook and Grad-CAM."""
from __future__ import annotations

import csv
import io
import json
import sqlite3
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import CLASSES, synthetic_cell

warnings.filterwarnings("ignore", message=".*`httpx`.*")  # starlette prefers httpx2; httpx works
from fastapi.testclient import TestClient  # noqa: E402  (a core dependency: never skipped)

from bloodcell.models import create_model, save_model  # noqa: E402
from bloodcell.predict import Classifier  # noqa: E402
from bloodcell.serve import ModelWorker, create_app  # noqa: E402

LOCAL = "http://127.0.0.1:8000"


def LabClient(app, **kw):
    """A test client that calls the app by a name it answers to (127.0.0.1, not
    TestClient's default 'testserver': other Host names are refused)."""
    return TestClient(app, base_url=LOCAL, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    save_model(create_model("cnn3", 8, 64), {"architecture": "cnn3", "classes": CLASSES,
                                             "image_size": 64, "version": "test-1"}, d)
    (d / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "macro_f1": 0.4}))
    return d


@pytest.fixture
def client(model_dir, tmp_path):
    with LabClient(create_app(model=str(model_dir), db_path=tmp_path / "db" / "lab.sqlite3",
                               screen=None)) as c:
        yield c


def png(label=0, size=96, seed=0, fmt="PNG") -> bytes:
    b = io.BytesIO()
    Image.fromarray(synthetic_cell(label, size, seed=seed)).save(b, fmt)
    return b.getvalue()


def bomb_png(w=20000, h=20000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb)."""
    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data))
    raw = zlib.compress(b"\x00" * (w + 1) * 4)  # a few rows; the header is what counts
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def post(client, *files, sample=None):
    data = {"sample": sample} if sample else {}
    return client.post("/api/predict", files=[("files", f) for f in files], data=data)


# ------------------------------------------------------------------ service

def test_health_model_card_docs(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["model"] == "cnn3" and h["classes"] == 8
    assert h["multi_cell_screen"] is False
    # ONNX Runtime by default; a silent fallback to torch would show here
    assert h["backend"] == "onnx" and client.app.state.lab.clf.backend == "onnx"
    m = client.get("/api/model").json()
    assert m["classes"] == CLASSES and m["image_size"] == 64 and m["version"] == "test-1"
    assert m["metrics"]["accuracy"] == 0.5  # metrics.json beside the model
    spec = client.get("/openapi.json").json()
    for path in ("/api/predict", "/api/samples/{sample_id}", "/api/cells/{cell_id}/correction",
                 "/api/samples/{sample_id}/export.csv", "/api/cells/{cell_id}/saliency"):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200


def test_page_is_served_and_offline(client):
    r = client.get("/")
    assert r.status_code == 200 and "bloodcell" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        a = client.get(asset)
        assert a.status_code == 200
        # no CDN: the only URL allowed is the SVG namespace identifier
        assert "https://" not in a.text and "//cdn" not in a.text
    assert "https://" not in r.text


# ------------------------------------------------------------------ predict

def test_predict_batch_with_bad_files(client, model_dir):
    good = [png(1, seed=1), png(5, seed=2, fmt="JPEG")]
    r = post(client, ("a.png", good[0], "image/png"), ("notes.txt", b"hello", "text/plain"),
             ("b.jpg", good[1], "image/jpeg"), ("broken.jpg", b"\xff\xd8\xff\xe0 trunc", "image/jpeg"),
             ("empty.png", b"", "image/png"), sample="patient 1")
    assert r.status_code == 200
    body = r.json()
    assert body["sample"] == "patient 1" and body["n_ok"] == 2 and body["n_errors"] == 3
    res = body["results"]
    assert [x["status"] for x in res] == ["ok", "error", "ok", "error", "error"]
    assert "notes.txt" in res[1]["error"] and "not an image" in res[1]["error"]
    assert "broken.jpg" in res[3]["error"] and "corrupt" in res[3]["error"]
    assert "empty.png" in res[4]["error"] and "empty" in res[4]["error"]
    assert "multi_cell" not in res[0]  # no screen installed: flag omitted
    # same preprocessing + model as `bloodcell predict`
    clf = Classifier.load(model_dir)
    for r_, data in zip((res[0], res[2]), good):
        ref = clf.predict([data])[0]
        assert r_["class"] == ref["class"]
        assert r_["probability"] == pytest.approx(ref["probability"], abs=1e-5)
        assert sum(r_["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert [t["class"] for t in r_["top3"]] == [t["class"] for t in ref["top3"]]
        assert r_["needs_review"] == ref["needs_review"]


def test_predict_requires_files(client):
    assert client.post("/api/predict", data={"sample": "x"}).status_code == 422


def test_oversize_file_is_a_per_file_error(model_dir, tmp_path):
    with LabClient(create_app(model=str(model_dir), db_path=tmp_path / "l.db", screen=None,
                               max_upload_mb=0.01)) as c:
        big = png(2, size=300, seed=3)
        assert len(big) > 0.01 * 2**20
        r = post(c, ("small.png", png(0, size=32), "image/png"), ("big.png", big, "image/png"))
        assert r.status_code == 200  # the good file is still classified
        body = r.json()
        assert body["n_ok"] == 1 and body["n_errors"] == 1
        ok, bad = body["results"]
        assert ok["status"] == "ok" and bad["status"] == "error" and "cell_id" not in bad
        assert "big.png" in bad["error"] and "0.01 MB per-file limit" in bad["error"]
        s = c.get(f"/api/samples/{body['sample_id']}").json()
        assert [x["file_name"] for x in s["cells"]] == ["small.png"]  # nothing stored for big.png
        r = post(c, ("big.png", big, "image/png"), sample="only big")
        assert r.status_code == 200 and r.json()["n_ok"] == 0
        assert [x["name"] for x in c.get("/api/samples").json()["samples"]] == ["default"]
    with LabClient(create_app(model=str(model_dir), db_path=tmp_path / "l2.db", screen=None,
                               max_request_mb=0.05)) as c:  # whole request, refused from its header
        r = post(c, ("big.png", png(2, size=300, seed=3) * 4, "image/png"))
        assert r.status_code == 413
    with LabClient(create_app(model=str(model_dir), db_path=tmp_path / "l3.db", screen=None,
                               max_files=2)) as c:
        r = post(c, *[(f"{i}.png", png(i), "image/png") for i in range(3)])
        assert r.status_code == 413 and "limit is 2" in r.json()["detail"]
        assert c.get("/api/samples").json()["samples"] == []


def test_decompression_bomb_is_a_per_file_error(client):
    r = post(client, ("bomb.png", bomb_png(), "image/png"), ("ok.png", png(), "image/png"))
    assert r.status_code == 200
    bomb, ok = r.json()["results"]
    assert ok["status"] == "ok" and bomb["status"] == "error" and "cell_id" not in bomb
    assert "bomb.png" in bomb["error"] and "decompression bomb" in bomb["error"]
    s = client.get(f"/api/samples/{r.json()['sample_id']}").json()
    assert [x["file_name"] for x in s["cells"]] == ["ok.png"]  # nothing stored for the bomb
    r = post(client, ("bomb.png", bomb_png(), "image/png"), sample="only a bomb")
    assert r.status_code == 200 and r.json()["n_ok"] == 0
    assert "only a bomb" not in {x["name"] for x in client.get("/api/samples").json()["samples"]}


def test_file_names_never_become_paths(client, tmp_path):
    from bloodcell.serve import clean_name
    assert clean_name("a\x00b\nc.png", 0) == "abc.png" and clean_name("", 4) == "file 5"
    evil = "../../../../tmp/evil.png"
    r = post(client, (evil, png(), "image/png"))
    res = r.json()["results"][0]
    assert res["status"] == "ok" and res["file"] == evil  # shown as given, never used as a path
    assert sorted(p.name for p in (tmp_path / "db").iterdir())[0] == "lab.sqlite3"
    assert all(p.name.startswith("lab.sqlite3") for p in (tmp_path / "db").iterdir())
    sid = r.json()["sample_id"]
    z = zipfile.ZipFile(io.BytesIO(client.get(f"/api/samples/{sid}/export.zip").content))
    assert all(".." not in n and "evil" not in n for n in z.namelist())


# ------------------------------------------------------------------ samples, corrections

def _upload_three(client, sample="smear A"):
    r = post(client, *[(f"c{i}.png", png(i, seed=i), "image/png") for i in (0, 3, 6)], sample=sample)
    assert r.status_code == 200
    return r.json()


def test_samples_cells_and_differential(client):
    up = _upload_three(client)
    _upload_three(client, "smear B")
    post(client, ("x.png", png(7), "image/png"), sample="smear A")  # same name -> same sample
    listed = {s["name"]: s for s in client.get("/api/samples").json()["samples"]}
    assert listed["smear A"]["n_cells"] == 4 and listed["smear B"]["n_cells"] == 3
    s = client.get(f"/api/samples/{up['sample_id']}").json()
    assert s["name"] == "smear A" and len(s["cells"]) == 4
    assert [c["file_name"] for c in s["cells"]] == ["c0.png", "c3.png", "c6.png", "x.png"]
    d = s["differential"]
    assert d["total"] == 4 and sum(d["counts"].values()) == 4
    assert sum(d["percent"].values()) == pytest.approx(100.0)
    expected = {c: sum(x["predicted_class"] == c for x in s["cells"]) for c in CLASSES}
    assert d["counts"] == expected
    from bloodcell.differential import proportion_ci
    assert all(d["ci95_percent"][c] == pytest.approx([100 * v for v in proportion_ci(k, 4)])
               for c, k in expected.items())
    from bloodcell.differential import leukocyte_differential
    assert d["white_cells"] == leukocyte_differential(d["counts"])
    assert client.get("/api/samples/nope").status_code == 404
    assert client.get("/api/samples/nope/export.csv").status_code == 404


def test_input_warnings_reach_the_page_and_the_export(client):
    gray = io.BytesIO()
    Image.fromarray(np.full((96, 96), 140, np.uint8)).save(gray, "PNG")
    r = post(client, ("cell.png", png(2), "image/png"), ("gray.png", gray.getvalue(), "image/png"),
             ("wide.png", _wide_png(), "image/png"), sample="checks")
    res = {x["file"]: x for x in r.json()["results"]}
    assert res["cell.png"]["input_warnings"] == []
    assert any("no colour" in w for w in res["gray.png"]["input_warnings"])
    assert res["gray.png"]["needs_review"]
    assert any("not square (192x64 px)" in w for w in res["wide.png"]["input_warnings"])
    s = client.get(f"/api/samples/{r.json()['sample_id']}").json()
    cells = {c["file_name"]: c for c in s["cells"]}
    assert cells["gray.png"]["input_warnings"] == res["gray.png"]["input_warnings"]
    assert s["differential"]["n_input_warnings"] == 2
    rows = list(csv.DictReader(io.StringIO(
        client.get(f"/api/samples/{r.json()['sample_id']}/export.csv").text)))
    assert {row["file_name"]: bool(row["input_warnings"]) for row in rows} == {
        "cell.png": False, "gray.png": True, "wide.png": True}


def _wide_png() -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.concatenate([synthetic_cell(k, 64, seed=k) for k in (1, 2, 3)], 1)).save(b, "PNG")
    return b.getvalue()


def test_database_from_before_the_input_checks_is_upgraded(model_dir, tmp_path):
    import sqlite3

    from bloodcell.serve import SCHEMA
    db = tmp_path / "old.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(SCHEMA.replace(", input_warnings TEXT, image_sha1 TEXT", ""))  # an earlier schema
    con.execute("INSERT INTO samples VALUES ('s1', 'old smear', '2026-01-01')")
    con.execute("INSERT INTO cells (id, sample_id, file_name, image, created, predicted_class, probability, "
                "probabilities, top3, needs_review) VALUES ('c1', 's1', 'a.png', x'00', '2026-01-01', "
                "'ig', 0.9, '{}', '[]', 0)")
    con.commit()
    con.close()
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:
        s = c.get("/api/samples/s1").json()
        assert s["cells"][0]["input_warnings"] == [] and s["differential"]["total"] == 1
        con = sqlite3.connect(db)  # old cells get their image hash, so duplicates are found there too
        assert con.execute("SELECT image_sha1 FROM cells WHERE id='c1'").fetchone()[0] == \
            "5ba93c9db0cff93f52b521d7420e43f6eda2784f"  # sha1 of b"\x00"
        con.close()
        assert post(c, ("b.png", png(1), "image/png"), sample="old smear").status_code == 200
        assert len(c.get("/api/samples/s1").json()["cells"]) == 2


def test_same_image_twice_is_not_counted_twice(client):
    a, b = png(1, seed=11), png(2, seed=12)
    first = post(client, ("a.png", a, "image/png"), ("b.png", b, "image/png"), sample="dup").json()
    again = post(client, ("a copy.png", a, "image/png"), ("c.png", png(3, seed=13), "image/png"),
                 ("b again.png", b, "image/png"), ("b again 2.png", b, "image/png"), sample="dup").json()
    st = [r["status"] for r in again["results"]]
    assert st == ["duplicate", "ok", "duplicate", "duplicate"] and again["n_ok"] == 1
    assert again["results"][0]["cell_id"] == first["results"][0]["cell_id"]
    assert "already in sample 'dup' (as a.png)" in again["results"][0]["error"]
    cells = client.get(f"/api/samples/{first['sample_id']}").json()["cells"]
    assert sorted(c["file_name"] for c in cells) == ["a.png", "b.png", "c.png"]
    other = post(client, ("a.png", a, "image/png"), sample="another smear").json()  # other sample: fine
    assert other["results"][0]["status"] == "ok"


def test_example_cells_go_into_a_demo_sample_as_uploads_would(client):
    from bloodcell.predict import example_files
    from bloodcell.serve import EXAMPLES_SAMPLE
    files = example_files()
    r = client.post("/api/examples")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["sample"] == EXAMPLES_SAMPLE and got["n_ok"] == 16 and got["n_errors"] == 0
    assert [x["file"] for x in got["results"]] == [f"{f.parent.name}/{f.name}" for f in files]
    detail = client.get(f"/api/samples/{got['sample_id']}").json()
    assert len(detail["cells"]) == 16 and detail["differential"]["n_cells"] == 16
    # the stored bytes are the shipped file's: the same path as an upload of that file
    first = got["results"][0]
    assert client.get(f"/api/cells/{first['cell_id']}/image").content == files[0].read_bytes()
    up = post(client, (files[0].name, files[0].read_bytes(), "image/jpeg"), sample="upload").json()
    assert up["results"][0]["probabilities"] == first["probabilities"]
    again = client.post("/api/examples").json()  # a second click adds nothing
    assert again["n_ok"] == 0 and {x["status"] for x in again["results"]} == {"duplicate"}
    named = client.post("/api/examples", data={"sample": "training session"}).json()
    assert named["sample"] == "training session" and named["n_ok"] == 16


def test_cell_image_and_tiff_reencoded(client):
    data = png(2)
    cid = post(client, ("a.png", data, "image/png")).json()["results"][0]["cell_id"]
    r = client.get(f"/api/cells/{cid}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == data
    tif = io.BytesIO()
    Image.fromarray(synthetic_cell(3, 80)).save(tif, "TIFF")
    cid = post(client, ("a.tif", tif.getvalue(), "image/tiff")).json()["results"][0]["cell_id"]
    r = client.get(f"/api/cells/{cid}/image")  # browsers cannot show TIFF: served as PNG
    assert r.headers["content-type"] == "image/png" and Image.open(io.BytesIO(r.content)).size == (80, 80)
    assert client.get("/api/cells/unknown/image").status_code == 404


def test_saliency_png(client):
    cid = post(client, ("a.png", png(4), "image/png")).json()["results"][0]["cell_id"]
    r = client.get(f"/api/cells/{cid}/saliency")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (320, 320) and im.mode == "RGB"
    assert client.get(f"/api/cells/{cid}/saliency", params={"class_name": "platelet"}).status_code == 200
    assert client.get(f"/api/cells/{cid}/saliency", params={"class_name": "dog"}).status_code == 422
    assert client.get("/api/cells/unknown/saliency").status_code == 404


def test_corrections_export_and_restart(model_dir, tmp_path):
    db = tmp_path / "lab.sqlite3"
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:
        up = _upload_three(c)
        sid = up["sample_id"]
        cell = up["results"][1]
        target = next(k for k in CLASSES if k != cell["class"])
        r = c.put(f"/api/cells/{cell['cell_id']}/correction", json={"true_class": target})
        assert r.status_code == 200
        assert r.json()["cell"]["true_class"] == target and r.json()["cell"]["class"] == target
        assert r.json()["differential"]["counts"][target] >= 1
        assert r.json()["differential"]["n_corrected"] == 1
        # POST works too; a second correction keeps the history
        other = up["results"][0]
        assert c.post(f"/api/cells/{other['cell_id']}/correction",
                      json={"true_class": "platelet"}).status_code == 200
        assert c.put(f"/api/cells/{other['cell_id']}/correction", json={"true_class": None}).status_code == 200
        assert c.put(f"/api/cells/{cell['cell_id']}/correction", json={"true_class": "dog"}).status_code == 422
        assert c.put("/api/cells/nope/correction", json={"true_class": "ig"}).status_code == 404
        before = c.get(f"/api/samples/{sid}").json()

    # a new app on the same database: everything is still there
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:
        s = c.get(f"/api/samples/{sid}").json()
        assert s["differential"] == before["differential"]
        got = {x["id"]: x for x in s["cells"]}
        assert got[cell["cell_id"]]["true_class"] == target
        assert got[cell["cell_id"]]["corrected_at"]
        assert got[other["cell_id"]]["true_class"] is None  # cleared
        hist = c.get(f"/api/cells/{other['cell_id']}").json()["corrections"]
        assert [h["true_class"] for h in hist] == ["platelet", None]
        assert hist[0]["previous_prediction"] == other["class"] and hist[0]["created"]
        assert hist[1]["previous_true_class"] == "platelet"

        rows = list(csv.DictReader(io.StringIO(c.get(f"/api/samples/{sid}/export.csv").text)))
        assert len(rows) == 3
        row = next(r for r in rows if r["cell_id"] == cell["cell_id"])
        assert row["file_name"] == "c3.png" and row["predicted_class"] == cell["class"]
        assert row["true_class"] == target and row["label"] == target
        assert row["image_path"] == f"{target}/{cell['cell_id']}.png"  # as named in the ZIP

        z = zipfile.ZipFile(io.BytesIO(c.get(f"/api/samples/{sid}/export.zip").content))
        assert f"{target}/{cell['cell_id']}.png" in z.namelist() and "labels.csv" in z.namelist()
        zc = zipfile.ZipFile(io.BytesIO(
            c.get(f"/api/samples/{sid}/export.zip", params={"corrected_only": True}).content))
        files = [n for n in zc.namelist() if not n.endswith("/")]
        assert sorted(files) == sorted([f"{target}/{cell['cell_id']}.png", "labels.csv"])
        assert sorted(n[:-1] for n in zc.namelist() if n.endswith("/")) == sorted(CLASSES)
        # the unpacked ZIP is a dataset folder that `bloodcell train` reads
        from bloodcell.data import scan
        z.extractall(tmp_path / "export")
        ds = scan(tmp_path / "export")
        assert ds.classes == CLASSES and len(ds) == 3 and not ds.skipped
        # a TIFF (no browser media type) keeps a readable extension in the export
        tif = io.BytesIO()
        Image.fromarray(synthetic_cell(2, 80)).save(tif, "TIFF")
        post(c, ("scan.tif", tif.getvalue(), "image/tiff"), sample="smear A")
        zt = zipfile.ZipFile(io.BytesIO(c.get(f"/api/samples/{sid}/export.zip").content))
        assert any(n.endswith(".tif") for n in zt.namelist())


def test_correction_body_requires_true_class(client):
    cid = _upload_three(client)["results"][0]["cell_id"]
    url = f"/api/cells/{cid}/correction"
    assert client.put(url, json={"true_class": "ig"}).status_code == 200
    # a missing or misspelled key must not clear the correction (it used to, with 200)
    for body in ({}, {"trueclass": "ig"}, {"true_class": "ig", "note": "x"}):
        for method in (client.put, client.post):
            r = method(url, json=body)
            assert r.status_code == 422, (body, r.text)
    assert client.get(f"/api/cells/{cid}").json()["true_class"] == "ig"
    assert [h["true_class"] for h in client.get(f"/api/cells/{cid}").json()["corrections"]] == ["ig"]
    assert client.put(url, json={"true_class": None}).json()["cell"]["true_class"] is None  # explicit clear


def test_csv_export_defuses_formulas(client):
    sid = post(client, ("=cmd|x.png", png(), "image/png")).json()["sample_id"]
    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/samples/{sid}/export.csv").text)))
    assert rows[0]["file_name"] == "'=cmd|x.png"


# ------------------------------------------------------------------ multi-cell screen hook

class FakeScreen:
    image_size = 32

    def __init__(self):
        self.calls = []

    def score_arrays(self, arrays):
        self.calls.append([a.shape for a in arrays])
        # "multi-cell" when the image is darker than the background mean
        return [{"score": float(255 - a.mean()) / 255, "n_regions": 2 if a.mean() < 190 else 1,
                 "multi_cell": bool(a.mean() < 190)} for a in arrays]


def test_multi_cell_flag_from_screen(model_dir, tmp_path):
    scr = FakeScreen()
    dark = np.full((64, 64, 3), 120, np.uint8)
    b = io.BytesIO()
    Image.fromarray(dark).save(b, "PNG")
    with LabClient(create_app(model=str(model_dir), db_path=tmp_path / "l.db", screen=scr)) as c:
        assert c.get("/api/health").json()["multi_cell_screen"] is True
        r = post(c, ("light.png", png(0), "image/png"), ("dark.png", b.getvalue(), "image/png"))
        res = r.json()["results"]
        assert res[0]["multi_cell"] is False and res[1]["multi_cell"] is True
        assert res[1]["n_regions"] == 2 and 0 <= res[0]["multi_cell_score"] <= 1
        assert scr.calls and all(s == (32, 32, 3) for call in scr.calls for s in call)
        s = c.get(f"/api/samples/{r.json()['sample_id']}").json()
        assert s["differential"]["n_multi_cell"] == 1
        assert [x["multi_cell"] for x in s["cells"]] == [False, True]


def test_flagged_cells_left_out_of_the_differential_until_reviewed(model_dir, tmp_path):
    from bloodcell.differential import proportion_ci
    with LabClient(create_app(model=str(model_dir), db_path=tmp_path / "l.db", screen=FakeScreen())) as c:
        r = post(c, ("a.png", png(0), "image/png"), ("b.png", png(3, seed=1), "image/png"),
                 ("dark.png", png(7, seed=2), "image/png"),  # darker: "multi-cell" for FakeScreen
                 ("wide.png", _wide_png(), "image/png"))
        res = {x["file"]: x for x in r.json()["results"]}
        flags = {f: (x["multi_cell"], bool(x["input_warnings"])) for f, x in res.items()}
        assert flags == {"a.png": (False, False), "b.png": (False, False),
                         "dark.png": (True, False), "wide.png": (False, True)}
        sid = r.json()["sample_id"]
        d = c.get(f"/api/samples/{sid}").json()["differential"]
        # as `bloodcell predict`: the multi-cell and the unusual image are not counted
        assert d["total"] == 2 and sum(d["counts"].values()) == 2 and d["n_left_out"] == 2
        expected = {k: sum(res[f]["class"] == k for f in ("a.png", "b.png")) for k in CLASSES}
        assert d["counts"] == expected
        assert all(d["ci95_percent"][k] == pytest.approx([100 * v for v in proportion_ci(n, 2)])
                   for k, n in expected.items())
        assert d["n_multi_cell"] == 1 and d["n_input_warnings"] == 1
        # a reviewer's class puts a flagged cell in the count, under that class
        d = c.put(f"/api/cells/{res['dark.png']['cell_id']}/correction",
                  json={"true_class": "platelet"}).json()["differential"]
        assert d["total"] == 3 and d["n_left_out"] == 1
        assert d["counts"]["platelet"] == expected["platelet"] + 1
        assert d["percent"]["platelet"] == pytest.approx(100 * (expected["platelet"] + 1) / 3)
        d = c.put(f"/api/cells/{res['dark.png']['cell_id']}/correction",
                  json={"true_class": None}).json()["differential"]  # cleared: left out again
        assert d["total"] == 2 and d["n_left_out"] == 2


def test_missing_screen_is_tolerated(model_dir, tmp_path):
    # AUTO never fails the app: either a loaded screen or None
    app = create_app(model=str(model_dir), db_path=tmp_path / "l.db")
    with LabClient(app) as c:
        assert c.get("/api/health").status_code == 200


# ------------------------------------------------------------------ worker, saliency, CLI

def test_model_worker_batches_concurrent_requests(model_dir):
    clf = Classifier.load(model_dir)
    arrays = [{"model": synthetic_cell(i % 8, 64, seed=i)} for i in range(6)]
    w = ModelWorker(clf)
    try:
        futs = [w.predict(arrays[i:i + 2]) for i in range(0, 6, 2)]
        got = np.concatenate([f.result(10)[0] for f in futs])
        assert all(f.result(10)[1] is None for f in futs)  # one view: no review scores
        np.testing.assert_allclose(got, clf.predict_proba_arrays(np.stack([a["model"] for a in arrays])),
                                   atol=1e-5)
        assert w.call(lambda a, b: a + b, 2, 3).result(10) == 5
        with pytest.raises(ZeroDivisionError):
            w.call(lambda: 1 / 0).result(10)
        # calls queued among predictions run after that batch, in order, and every future is answered
        mixed = [w.predict(arrays[:1]), w.call(lambda: "gradcam"), w.predict(arrays[1:3])]
        got = [f.result(10) for f in mixed]
        assert got[1] == "gradcam" and got[0][0].shape == (1, 8) and got[2][0].shape == (2, 8)
    finally:
        w.close()


class _Channels(nn.Module):
    """1x1 conv: channel 0 = 'red', channel 1 = 'blue'; logits = channel means."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([[1., 0, -1], [-1., 0, 1]]).view(2, 3, 1, 1) / 255
        self.act = nn.ReLU(inplace=True)  # in-place after the hooked layer, on purpose

    def forward(self, x):
        return self.act(self.conv(x)).mean((2, 3))


def test_gradcam_points_at_the_evidence():
    from bloodcell.saliency import gradcam, overlay_png
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16, 0] = 255   # left half red
    img[:, 16:, 2] = 255   # right half blue
    model = _Channels().eval()
    heat0, idx0 = gradcam(model, img, 0)
    heat1, _ = gradcam(model, img, 1)
    assert idx0 == 0 and heat0.shape == (32, 32) and heat0.min() >= 0 and heat0.max() == pytest.approx(1)
    assert heat0[:, :14].mean() > 0.9 and heat0[:, 18:].mean() < 0.1   # red evidence on the left
    assert heat1[:, 18:].mean() > 0.9 and heat1[:, :14].mean() < 0.1   # blue on the right
    png_bytes = overlay_png(img, heat0, size=64)
    assert Image.open(io.BytesIO(png_bytes)).size == (64, 64)


def test_gradcam_on_registry_models():
    from bloodcell.saliency import gradcam, target_layer
    for name, size in (("cnn3", 64), ("dnn", 32), ("lite0-frozen", 64)):
        m = create_model(name, 8, size, pretrained=False).eval()
        heat, idx = gradcam(m, synthetic_cell(2, size))
        assert heat.shape == (size, size) and np.isfinite(heat).all() and 0 <= idx < 8, name
    assert target_layer(create_model("dnn", 8, 32)) is None


def test_cli_binds_loopback_by_default():
    from bloodcell.cli import build_parser
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_upload_mb == 20


@pytest.mark.parametrize("argv, expect", [
    (["--port", "99999"], "99999"), (["--port", "x"], "'x'"), (["--max-upload-mb", "0"], "0"),
    (["--max-upload-mb", "nan"], "nan"), (["--threads", "0"], "0"), (["--threads", "99"], "99")])
def test_cli_rejects_bad_values(argv, expect, capsys):
    from bloodcell.cli import build_parser
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert argv[0] in err and expect in err, err


def test_cli_bad_model_and_db_fail_with_one_line(model_dir, tmp_path, capsys, caplog, monkeypatch):
    import uvicorn

    from bloodcell.cli import main
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("server started"))
    missing = tmp_path / "nonexist"
    assert main(["serve", "--model", str(missing), "--db", str(tmp_path / "a.db")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1, err
    assert "ONNX" not in caplog.text  # no misleading backend warning first
    assert not (tmp_path / "a.db").exists()
    notdb = tmp_path / "notes.sqlite3"
    notdb.write_text("not a database " * 100)
    foreign = tmp_path / "crm.sqlite3"  # another program's database: not the lab's to add tables to
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE customers (id INTEGER)")
    for db in (tmp_path, notdb, foreign, "/proc/x.sqlite"):
        if str(db).startswith("/proc") and not Path("/proc").is_dir():
            continue
        assert main(["serve", "--model", str(model_dir), "--db", str(db), "--no-screen"]) == 2
        err = capsys.readouterr().err
        assert str(db) in err and len(err.strip().splitlines()) == 1, err
        assert db != foreign or "not a bloodcell lab database (its tables: customers)" in err
    with sqlite3.connect(foreign) as c:
        assert [r[0] for r in c.execute("SELECT name FROM sqlite_master")] == ["customers"]


# ------------------------------------------------------------------ issue 16: hardening

def test_json_bodies_are_limited_and_not_echoed(client):
    cid = _upload_three(client)["results"][0]["cell_id"]
    url = f"/api/cells/{cid}/correction"
    big = json.dumps({"true_class": "x" * (2 * 2**20)})  # 2 MB: declared size over the limit
    r = client.put(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "64 KB limit" in r.json()["detail"]

    def chunks():  # no declared size: counted while read
        for _ in range(40):
            yield b" " * 4096
        yield b'{"true_class": "ig"}'
    r = client.put(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get(f"/api/cells/{cid}").json()["true_class"] is None  # nothing applied
    # an invalid value under the limit is named, not echoed back whole
    for body in ({"true_class": "y" * 30000}, {"true_class": 5, "note": "z" * 30000},
                 {"true_class": ["w" * 30000]}):
        r = client.put(url, json=body)
        assert r.status_code == 422 and len(r.content) < 2000, (len(r.content), r.text[:200])
    assert "unknown class 'yyyy" in client.put(url, json={"true_class": "y" * 30000}).json()["detail"]
    assert client.put(url, json={"true_class": "ig"}).status_code == 200  # small bodies still work


def test_empty_database_file_warns(model_dir, tmp_path, caplog):
    db = tmp_path / "lab.db"
    db.write_bytes(b"")
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:
        assert c.get("/api/samples").json()["samples"] == []
    assert str(db) in caplog.text and "empty (0-byte) file" in caplog.text
    caplog.clear()
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:  # now a database
        assert c.get("/api/samples").status_code == 200
    assert "empty (0-byte)" not in caplog.text


def _damaged_db_with_wal(tmp_path) -> Path:
    """lab.db truncated to half its size beside its -wal file (the issue's repro: the WAL is
    there after a kill). The lab's own writes: SQLite's automatic checkpoint moved the older
    cells into lab.db, the newer ones are in the WAL."""
    import hashlib
    import shutil

    from bloodcell.serve import Store
    live = tmp_path / "live" / "lab.db"
    store = Store(live)
    sid = store.sample_for_name("smear")["id"]
    rng = np.random.default_rng(0)
    for k in range(100):
        img = rng.bytes(20000)
        store.add_cells([{"id": f"c{k}", "sample_id": sid, "file_name": f"{k}.png", "media_type": "image/png",
                          "image": img, "created": "2026-01-01", "model_version": "x", "predicted_class": "ig",
                          "probability": 0.9, "probabilities": "{}", "top3": "[]", "needs_review": 0,
                          "multi_cell": None, "multi_cell_score": None, "n_regions": None,
                          "input_warnings": "[]", "image_sha1": hashlib.sha1(img).hexdigest()}])
    bad = tmp_path / "bad" / "lab.db"
    bad.parent.mkdir()
    shutil.copy(live, bad)
    shutil.copy(live.with_name("lab.db-wal"), bad.with_name("lab.db-wal"))
    store.close()
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    return bad


def test_damaged_database_with_wal_is_refused_at_start(model_dir, tmp_path, capsys, monkeypatch):
    """It used to start, and then every page load was a 500 (database disk image is malformed)."""
    import uvicorn

    from bloodcell.cli import main
    bad = _damaged_db_with_wal(tmp_path)
    with pytest.raises(OSError) as e:
        create_app(model=str(model_dir), db_path=bad, screen=None)
    msg = str(e.value)
    assert str(bad) in msg and "damaged" in msg and "bloodcell backup" in msg and ".recover" in msg
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("server started"))
    assert main(["serve", "--model", str(model_dir), "--db", str(bad), "--no-screen"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "damaged" in err and len(err.strip().splitlines()) == 1, err


def test_other_sites_can_neither_write_nor_read(model_dir, tmp_path):
    """Host allow-list (DNS rebinding) and a same-origin check on state-changing requests
    (a page on another port used to store a cell with a no-cors fetch)."""
    with TestClient(create_app(model=str(model_dir), db_path=tmp_path / "l.db", screen=None,
                               host="lab-pc.local")) as c:
        for host in ("127.0.0.1:8000", "localhost:8000", "localhost", "[::1]:8000", "lab-pc.local:8000"):
            assert c.get("/api/samples", headers={"host": host}).status_code == 200, host
        for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example", ""):
            r = c.get("/api/samples", headers={"host": host})
            assert r.status_code == 400 and "host" in r.text.lower(), host
        assert c.get("/", headers={"host": "attacker.example"}).status_code == 400
        here = {"host": "127.0.0.1:8000"}
        files = [("files", ("a.png", png(), "image/png"))]
        for hdr in ({"origin": "http://127.0.0.1:9999"}, {"origin": "null"},
                    {"origin": "http://attacker.example"}, {"origin": "https://127.0.0.1:8000"},
                    {"referer": "http://127.0.0.1:9999/page.html"}):
            r = c.post("/api/predict", files=files, data={"sample": "x"}, headers={**here, **hdr})
            assert r.status_code == 403 and "origin" in r.text.lower(), hdr
        assert c.get("/api/samples", headers=here).json()["samples"] == []  # nothing stored
        r = c.post("/api/predict", files=files, headers={**here, "origin": "http://127.0.0.1:8000"})
        assert r.status_code == 200  # the page itself
        cid = r.json()["results"][0]["cell_id"]
        r = c.put(f"/api/cells/{cid}/correction", json={"true_class": "ig"},
                  headers={**here, "origin": "http://localhost:8000"})
        assert r.status_code == 403  # another origin, even on this machine
        r = c.put(f"/api/cells/{cid}/correction", json={"true_class": "ig"},
                  headers={**here, "referer": "http://127.0.0.1:8000/"})
        assert r.status_code == 200
        # no Origin and no Referer: not a browser (curl, scripts): allowed
        assert c.post("/api/predict", files=[("files", ("b.png", png(1), "image/png"))],
                      headers=here).status_code == 200


def test_second_server_on_the_same_database_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    db = tmp_path / "lab.db"
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:
        assert post(c, ("a.png", png(), "image/png")).status_code == 200
        with pytest.raises(OSError, match="in use by another bloodcell serve"):
            create_app(model=str(model_dir), db_path=db, screen=None)
        import uvicorn

        from bloodcell.cli import main
        monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("server started"))
        assert main(["serve", "--model", str(model_dir), "--db", str(db), "--no-screen"]) == 2
        err = capsys.readouterr().err
        assert str(db) in err and "in use" in err and len(err.strip().splitlines()) == 1, err
        assert c.get("/api/samples").status_code == 200  # the first one goes on
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:  # free again
        assert len(c.get("/api/samples").json()["samples"]) == 1


def _hold_write_lock(db, seconds, started):
    import sqlite3
    con = sqlite3.connect(db, isolation_level=None, timeout=30)
    con.execute("BEGIN IMMEDIATE")
    import secrets
    con.execute("INSERT INTO samples VALUES (?, ?, '2026-01-01')",
                (secrets.token_hex(4), f"written by another program {secrets.token_hex(4)}"))
    started.set()
    import time
    time.sleep(seconds)
    con.execute("COMMIT")
    con.close()


def test_busy_database_waits_and_never_acknowledges_a_lost_write(model_dir, tmp_path, monkeypatch):
    """Another program writing (sqlite3, a backup, a second server): an upload waits for the
    write lock instead of failing with 500 'database is locked' and losing the batch; past
    the wait it is refused with 503 and nothing stored, never answered 200 and lost."""
    import threading

    from bloodcell.serve import store as store_mod
    db = tmp_path / "lab.db"
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:
        assert post(c, ("a.png", png(0), "image/png"), sample="s").status_code == 200
        started = threading.Event()
        t = threading.Thread(target=_hold_write_lock, args=(db, 1.0, started))
        t.start()
        started.wait(10)
        r = post(c, ("b.png", png(1), "image/png"), ("c.png", png(2), "image/png"), sample="s")
        t.join()
        assert r.status_code == 200 and r.json()["n_ok"] == 2, r.text
        sid = r.json()["sample_id"]
        assert len(c.get(f"/api/samples/{sid}").json()["cells"]) == 3
        monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 0.2)
        c.app.state.lab.store.conn.execute("PRAGMA busy_timeout=200")
        started.clear()
        t = threading.Thread(target=_hold_write_lock, args=(db, 1.5, started))
        t.start()
        started.wait(10)
        r = post(c, ("d.png", png(3), "image/png"), sample="s")
        t.join()
        assert r.status_code == 503 and "busy" in r.json()["detail"], r.text
        assert len(c.get(f"/api/samples/{sid}").json()["cells"]) == 3  # not stored, not acknowledged
        assert post(c, ("d.png", png(3), "image/png"), sample="s").json()["n_ok"] == 1  # a retry works


def test_backup_while_serving(model_dir, tmp_path, capsys):
    """`bloodcell backup`: a consistent, checked copy of a live database (latest writes,
    still in the WAL, included), in one file; the server goes on."""
    import sqlite3

    from bloodcell.cli import main
    db, out = tmp_path / "lab.db", tmp_path / "backups" / "lab-copy.db"
    with LabClient(create_app(model=str(model_dir), db_path=db, screen=None)) as c:
        cid = _upload_three(c)["results"][0]["cell_id"]
        assert c.put(f"/api/cells/{cid}/correction", json={"true_class": "ig"}).status_code == 200
        assert db.with_name("lab.db-wal").stat().st_size > 0  # the latest writes are in the WAL
        assert main(["backup", "--db", str(db), "--out", str(out)]) == 0
        assert "3 cell(s), 1 correction(s); integrity check ok" in capsys.readouterr().out
        assert post(c, ("x.png", png(7), "image/png")).status_code == 200  # still serving
    assert not out.with_name(out.name + "-wal").exists()  # one self-contained file
    con = sqlite3.connect(out)
    try:
        assert con.execute("SELECT true_class FROM cells WHERE id=?", (cid,)).fetchone() == ("ig",)
        assert con.execute("SELECT COUNT(*) FROM cells").fetchone() == (3,)
    finally:
        con.close()
    with LabClient(create_app(model=str(model_dir), db_path=out, screen=None)) as c:  # a usable lab
        assert c.get(f"/api/cells/{cid}").json()["true_class"] == "ig"
    assert main(["backup", "--db", str(db), "--out", str(db)]) == 2
    assert main(["backup", "--db", str(tmp_path / "none.db"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is the database itself" in err and "none.db not found" in err
    assert not [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left
    bad = _damaged_db_with_wal(tmp_path)
    assert main(["backup", "--db", str(bad), "--out", str(tmp_path / "b2.db")]) == 2
    assert "damaged" in capsys.readouterr().err and not (tmp_path / "b2.db").exists()
