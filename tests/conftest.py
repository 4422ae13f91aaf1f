"""Shared fixtures: synthetic images for unit tests, the real PBC folder when present.

Skips and ``BLOODCELL_REQUIRE``: locally, tests that need ../shared/data/pbc
(marker ``realdata``) or headless Chromium (marker ``browser``) skip when it is
missing, and those of the optional extras (Ray, MLflow) when they do not import.
CI must not go green that way: ``BLOODCELL_REQUIRE=data,browser,deps`` (set by
.ci/run) turns every skip of a realdata/browser test into a failure and stops the
run at once when an extra does not import. A core dependency (fastapi, ...) is
imported plainly, so a broken install fails collection instead of skipping tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# what `--backend auto` (predict's and serve's default) runs the bundled model with here
from bloodcell.cpu import has_int8_dot  # noqa: E402

BUNDLED_BACKEND = "onnx-int8" if has_int8_dot() else "onnx"
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
           "neutrophil", "platelet"]
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbc"
# what must be there (comma-separated): data = ../shared/data/pbc, browser = headless
# Chromium (and selenium), deps = the extras `make install` installs ([test,scale])
REQUIRED = {k.strip() for k in os.environ.get("BLOODCELL_REQUIRE", "").split(",") if k.strip()}
_REQUIRE_MARKERS = {"realdata": "data", "browser": "browser"}
_REQUIRE_IMPORTS = {"browser": ("selenium",), "deps": ("httpx", "selenium", "ray", "mlflow", "pyarrow")}
if REQUIRED - {"data", "browser", "deps"}:
    raise ValueError(f"BLOODCELL_REQUIRE={os.environ['BLOODCELL_REQUIRE']}: "
                     "known values are data, browser, deps")
for _mod in sorted({m for k in REQUIRED for m in _REQUIRE_IMPORTS.get(k, ())}):
    try:  # an optional extra that does not import would skip its tests (importorskip)
        __import__(_mod)
    except ImportError as e:
        raise ImportError(f"BLOODCELL_REQUIRE={os.environ['BLOODCELL_REQUIRE']}: "
                          f"{_mod} does not import ({e})") from e


def pytest_collection_modifyitems(items):
    for item in items:  # a test reading the real data is a realdata test, marked or not
        if {"real_data", "real_test_split"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With BLOODCELL_REQUIRE, a skipped realdata/browser test is a failure."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or hasattr(rep, "wasxfail"):
        return
    need = sorted(kind for marker, kind in _REQUIRE_MARKERS.items()
                  if kind in REQUIRED and item.get_closest_marker(marker))
    if need:
        why = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (f"BLOODCELL_REQUIRE={','.join(sorted(REQUIRED))} needs {', '.join(need)}, "
                        f"but the test was skipped: {why}")


# `bloodcell ARGS...` as a process, with this interpreter (and its PYTHONPATH)
BLOODCELL = [sys.executable, "-c", "import sys; from bloodcell.cli import main; sys.exit(main())"]


def synthetic_cell(label: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """A pinkish background with a purple 'nucleus' whose size/shape depends on the class:
    learnable, so tiny models can be checked to beat chance."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (230, 200, 210)
    img += rng.normal(0, 6, img.shape)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.normal(0, 2, 2)
    r = size * (0.08 + 0.035 * label)
    ecc = 1.0 + 0.15 * (label % 3)
    mask = ((yy - c[0]) / r) ** 2 + ((xx - c[1]) / (r * ecc)) ** 2 < 1
    img[mask] = (110 + 8 * label, 60, 150)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def synthetic_dataset(tmp_path):
    """ROOT/<class>/<n>.png for 8 classes x 12 images, plus a few junk files."""
    from PIL import Image
    root = tmp_path / "data"
    for label, cls in enumerate(CLASSES):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(synthetic_cell(label, seed=label * 100 + i)).save(d / f"{cls}_{i}.png")
    (root / "neutrophil" / ".DS_000.jpg").write_bytes(b"\x00\x05Bud1 not an image")
    (root / "platelet" / "empty.jpg").write_bytes(b"")
    (root / "basophil" / "notes.txt").write_text("not an image")
    (root / "eosinophil" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return root


def _need_real_data() -> Path:
    if not REAL_DATA.is_dir():
        msg = f"real PBC data not found at {REAL_DATA}"
        if "data" in REQUIRED:  # also for a test that forgot its realdata marker
            pytest.fail(f"BLOODCELL_REQUIRE includes data: {msg}")
        pytest.skip(msg)
    return REAL_DATA


@pytest.fixture
def real_data():
    return _need_real_data()


@pytest.fixture(scope="session")
def real_test_split(tmp_path_factory):
    """[(path, class)] of the held-out test split of ../shared/data/pbc that
    `bloodcell evaluate --split test` uses (seed 42, 64/16/20: 2,393 images), checked
    to be the very split the bundled model was trained with (split-manifest hash)."""
    import json

    from bloodcell import data as D
    from bloodcell.modelfile import BUNDLED_DIR
    ds = D.scan(_need_real_data())
    splits = D.make_split(ds)
    sha = D.write_manifest(tmp_path_factory.mktemp("split") / "split.csv", ds, splits)
    assert sha == json.loads((BUNDLED_DIR / "model.json").read_text())["split_manifest_sha1"]
    return [(ds.root / ds.samples[i].path, ds.classes[ds.samples[i].label])
            for i in D.split_indices(splits, "test")]


@pytest.fixture(scope="session")
def _shared_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture
def shared_cache(_shared_cache_dir, monkeypatch):
    """One cache for the tests of the bundled model and the processes they start, so
    its ONNX export is made once per session, not once per test."""
    monkeypatch.setenv("BLOODCELL_CACHE", str(_shared_cache_dir))
    return _shared_cache_dir


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Unit tests never touch the user's decoded-image cache."""
    if "BLOODCELL_TEST_CACHE" in os.environ:  # real-data tests may share one to save decoding
        monkeypatch.setenv("BLOODCELL_CACHE", os.environ["BLOODCELL_TEST_CACHE"])
    else:
        monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
