"""An installed wheel (not the editable source tree) carries everything the package
needs at run time: bundled model and screen, the int8 file, the lab page."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import BUNDLED_BACKEND, CLASSES, synthetic_cell

ROOT = Path(__file__).resolve().parents[1]


def _package_files() -> set[str]:
    """Files of src/bloodcell the repository tracks (not caches, not local exports)."""
    try:
        out = subprocess.run(["git", "ls-files", "src/bloodcell"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what is on disk
        out = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "bloodcell").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    return {p.removeprefix("src/") for p in out}


@pytest.mark.slow
def test_wheel_install_predicts_with_its_bundled_files(shared_cache, tmp_path):
    """`pip wheel` + `pip install --target` (no editable path): every file of the package
    is in the wheel, and `bloodcell predict` runs from the installed copy with the
    bundled weights. Fails if package-data misses the model, screen or page files."""
    src = tmp_path / "src-copy"  # build from a copy: setuptools writes build/ and egg-info
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                                             "*.egg-info"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("bloodcell-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _package_files() - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    for f in ("bloodcell/bundled/model.safetensors", "bloodcell/bundled/model.json",
              "bloodcell/bundled/screen.json", "bloodcell/static/index.html"):
        assert f in names

    site = tmp_path / "site"
    r = subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    img = tmp_path / "cell.png"
    Image.fromarray(synthetic_cell(4, size=128, seed=1)).save(img)
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not src/
    code = ("import sys, bloodcell; print(bloodcell.__file__, file=sys.stderr); "
            "from bloodcell.cli import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code, "predict", str(img), "--out", str(tmp_path / "r.json"),
                        "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.splitlines()[0].startswith(str(site / "bloodcell"))
    res = json.loads((tmp_path / "r.json").read_text())
    s, (rec,) = res["summary"], res["results"]
    assert s["model"] == str(site / "bloodcell" / "bundled" / "model.safetensors")
    assert s["backend"] == BUNDLED_BACKEND and s["multi_cell_screen"] is True
    assert rec["status"] == "ok" and rec["class"] in CLASSES and "multi_cell" in rec
