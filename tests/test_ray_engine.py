"""``bloodcell predict --engine ray`` on a local Ray instance (2 CPUs) that the test
starts: the same class for every image as the local engine, the same CSV columns,
skipped files with their reasons, and Parquet output. Real PBC images when
../shared/data/pbc exists (400, all classes), synthetic ones otherwise."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_DATA, synthetic_cell

from bloodcell import batch as B
from bloodcell import predict as P

ray = pytest.importorskip("ray", reason="Ray is the optional extra bloodcell[scale]")
from bloodcell import ray_engine as R  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    R.connect(R.RayOptions(num_cpus=2))
    yield
    ray.shutdown()


def _cells(root, n=400):
    """n images, links to real PBC files spread over the classes, else synthetic PNGs."""
    root.mkdir()
    if REAL_DATA.is_dir():
        classes = sorted(d for d in REAL_DATA.iterdir() if d.is_dir())
        per = -(-n // len(classes))
        files = [f for d in classes for f in sorted(d.glob("[!.]*.jpg"))[:per]][:n]
        for f in files:
            (root / f.name).symlink_to(f)
    else:
        for i in range(n):
            Image.fromarray(synthetic_cell(i % 8, size=96, seed=i)).save(root / f"c{i:03d}.png")
    return root


def test_ray_engine_matches_local_engine(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))  # where the ONNX file goes
    cells = _cells(tmp_path / "cells")
    (cells / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (cells / "empty.png").write_bytes(b"")
    clf = P.Classifier.load(backend="onnx")  # the bundled model and its screen
    local, _ = B.predict_paths(clf, [str(cells)], out=tmp_path / "local.csv", progress=False)
    spec = R.ModelSpec(None, backend="onnx", screen="auto", onnx_path=str(clf.onnx_path))
    recs, summary = R.predict_ray(clf, [str(cells)], spec, R.RayOptions(batch_size=32),
                                  out=tmp_path / "ray.csv", progress=False)

    assert [r["path"] for r in recs] == [r["path"] for r in local]
    ok = [r for r in local if r["status"] == "ok"]
    assert len(ok) == 400 and summary["n_ok"] == 400 and summary["engine"] == "ray"
    assert [r.get("class") for r in recs] == [r.get("class") for r in local]
    assert [r.get("multi_cell") for r in recs] == [r.get("multi_cell") for r in local]
    assert np.allclose([r["probability"] for r in recs if r["status"] == "ok"],
                       [r["probability"] for r in ok], atol=1e-4)
    skipped = {k["path"].rsplit("/", 1)[1]: k["reason"] for k in summary["skipped"]}
    assert set(skipped) == {"broken.jpg", "empty.png"}
    assert [r["status"] for r in recs if r["status"] != "ok"] == \
        [r["status"] for r in local if r["status"] != "ok"]

    with open(tmp_path / "local.csv") as a, open(tmp_path / "ray.csv") as b:
        ra, rb = list(csv.reader(a)), list(csv.reader(b))
    assert ra[0] == rb[0] and len(ra) == len(rb) == 403
    assert [row[:3] for row in ra] == [row[:3] for row in rb]  # path, status, class

    pq = pytest.importorskip("pyarrow.parquet")
    R.write_any(tmp_path / "ray.parquet", recs, clf.classes, summary)
    t = pq.read_table(tmp_path / "ray.parquet")
    assert t.column_names == ra[0] and t.num_rows == 402
    assert t.column("class").to_pylist() == [r.get("class") for r in recs]


def test_ray_engine_reports_a_missing_ray(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ValueError, match=r"bloodcell\[scale\]"):
        R._ray()


def test_parquet_only_with_the_ray_engine(tmp_path):
    with pytest.raises(ValueError, match="parquet"):
        B.check_out_path(tmp_path / "r.parquet")
    assert B.check_out_path(tmp_path / "r.parquet", parquet=True).suffix == ".parquet"
