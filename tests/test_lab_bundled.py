"""The lab page with what it ships with: the bundled model (ONNX Runtime) and the
bundled multi-cell screen -- on real cells where ../shared/data is present, so that
confident answers, a mixed differential and the screen's flags are exercised; and
`bloodcell serve` started as a real process and spoken to over HTTP."""
from __future__ import annotations

import csv
import io
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import BLOODCELL, BUNDLED_BACKEND, CLASSES, REAL_DATA, synthetic_cell
from test_browser import free_port

from bloodcell.differential import WHITE_CELLS
from bloodcell.predict import Classifier, example_files
from bloodcell.serve import create_app

ROOT = Path(__file__).resolve().parents[1]
LOCAL = "http://127.0.0.1:8000"  # a Host name the server answers to


def png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def post(client, files: list[tuple[str, bytes]], sample: str):
    return client.post("/api/predict", data={"sample": sample},
                       files=[("files", (name, data, "application/octet-stream")) for name, data in files])


def same_as_predict(results: list[dict], datas: list[bytes]) -> None:
    """The page's answers are `bloodcell predict`'s: bundled model, ONNX, bundled screen."""
    ref = Classifier.load(backend="auto").predict(datas)
    for got, want in zip(results, ref, strict=True):
        assert got["status"] == "ok" and want["status"] == "ok"
        assert got["class"] == want["class"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert got["needs_review"] == want["needs_review"]
        assert got["input_warnings"] == want["input_warnings"]
        assert got["multi_cell"] == want["multi_cell"]
        assert got["multi_cell_score"] == pytest.approx(want["multi_cell_score"], abs=1e-3)


def test_lab_page_runs_the_bundled_model_and_screen(shared_cache, tmp_path):
    """Defaults of `bloodcell serve` (bundled model through ONNX Runtime, bundled screen)
    on the 16 example cells shipped in the package (real PBC cells, 2 per class; no
    ../shared needed): right and confident on nearly all, every class in the count.
    Fails if ONNX cannot load and the server quietly falls back to torch."""
    files = example_files()
    with TestClient(create_app(db_path=tmp_path / "lab.sqlite3"), base_url=LOCAL) as c:
        h = c.get("/api/health").json()
        assert h["backend"] == BUNDLED_BACKEND and h["model"] == "lite0-recipe"
        assert h["multi_cell_screen"] is True and h["classes"] == 8
        datas = [f.read_bytes() for f in files] + [png(synthetic_cell(3, size=128, seed=1))]
        body = post(c, [(f.name, d) for f, d in zip(files, datas)] + [("synthetic.png", datas[-1])],
                    "examples").json()
        assert body["n_ok"] == 17
        res = body["results"]
        assert sum(r["class"] == f.parent.name for r, f in zip(res, files)) >= 15
        assert sum(not r["needs_review"] for r in res[:16]) >= 13  # confident answers
        same_as_predict(res, datas)
        d = c.get(f"/api/samples/{body['sample_id']}").json()["differential"]
        assert sum(k > 0 for k in d["counts"].values()) >= 7  # a mixed differential


def _checkset_multi(n: int) -> list[Path]:
    """Images the hand-labelled check set (docs/screen/checkset.csv) calls multi-cell."""
    rows = csv.DictReader(open(ROOT / "docs" / "screen" / "checkset.csv", newline=""))
    return [REAL_DATA / r["path"] for r in rows if r["label"] == "multi" and r["note"].startswith("random")][:n]


def test_lab_page_on_real_cells(real_test_split, shared_cache, tmp_path):
    """3 held-out cells of each class + 3 multi-cell images: the bundled model is right
    and confident on nearly all, the differential is mixed (every class counted), the
    real screen flags the multi-cell images and they are left out of the count."""
    by_class: dict[str, list[Path]] = {}
    for path, cls in real_test_split:
        by_class.setdefault(cls, []).append(path)
    cells = [(p, cls) for cls in CLASSES for p in by_class[cls][:3]]
    multi = _checkset_multi(3)
    files = [(p.name, p.read_bytes()) for p, _ in cells] + [(p.name, p.read_bytes()) for p in multi]
    with TestClient(create_app(db_path=tmp_path / "lab.sqlite3"), base_url=LOCAL) as c:
        body = post(c, files, "real smear").json()
        assert body["n_ok"] == len(files) == 27
        res = body["results"]
        single, several = res[:24], res[24:]
        right = sum(r["class"] == cls for r, (_, cls) in zip(single, cells))
        assert right >= 22, [(r["class"], cls) for r, (_, cls) in zip(single, cells)]
        assert sum(not r["needs_review"] for r in single) >= 20  # confident answers
        assert sum(r["multi_cell"] for r in several) >= 2 and sum(r["multi_cell"] for r in single) <= 1
        same_as_predict(res, [d for _, d in files])

        d = c.get(f"/api/samples/{body['sample_id']}").json()["differential"]
        flagged = sum(bool(r["multi_cell"] or r["input_warnings"]) for r in res)
        assert d["n_cells"] == 27 and d["n_left_out"] == flagged and d["total"] == 27 - flagged
        assert sum(k > 0 for k in d["counts"].values()) == 8  # a mixed differential
        counted = [r for r in res if not (r["multi_cell"] or r["input_warnings"])]
        assert d["counts"] == {k: sum(r["class"] == k for r in counted) for k in CLASSES}
        w = d["white_cells"]
        assert w["n_white"] == sum(d["counts"][k] for k in WHITE_CELLS)
        assert w["n_platelet"] == d["counts"]["platelet"]
        assert sum(w["percent"].values()) == pytest.approx(100.0)


def test_bloodcell_serve_as_a_process(shared_cache, tmp_path):
    """`bloodcell serve` started for real on a free loopback port: the page, the API and
    the database over HTTP, then a clean stop on SIGINT (Ctrl-C)."""
    port, db = free_port(), tmp_path / "lab.sqlite3"
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(BLOODCELL + ["serve", "--port", str(port), "--db", str(db),
                                         "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "bloodcell serve did not answer"
            try:
                h = httpx.get(f"{url}/api/health", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert h["backend"] == BUNDLED_BACKEND and h["model"] == "lite0-recipe" and h["multi_cell_screen"]
        page = httpx.get(f"{url}/", timeout=30)
        assert page.status_code == 200 and "bloodcell" in page.text
        data = png(synthetic_cell(2, size=128, seed=7))
        r = httpx.post(f"{url}/api/predict", data={"sample": "over http"},
                       files=[("files", ("cell.png", data, "image/png"))], timeout=60)
        assert r.status_code == 200 and r.json()["n_ok"] == 1
        same_as_predict(r.json()["results"], [data])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode in (0, 130), out[-3000:]  # stopped, not killed
    with sqlite3.connect(db) as con:  # what it stored is in the database file
        assert con.execute("SELECT file_name, predicted_class FROM cells").fetchall() == \
            [("cell.png", r.json()["results"][0]["class"])]
