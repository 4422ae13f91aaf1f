"""End-to-end: the lab page in real headless Chromium (Debian chromium +
chromium-driver, driven by Selenium) against a live uvicorn server.

Also makes the README screenshots from the example cells shipped in the package:
    .venv/bin/python tests/test_browser.py --screenshot docs/screenshot.png
"""
from __future__ import annotations

import contextlib
import io
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import BUNDLED_BACKEND, CLASSES, synthetic_cell  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else shutil.which("chromedriver")


def tiny_model(out: Path, train_steps: int = 0) -> Path:
    """A cnn3 at 64 px, optionally fitted a little on synthetic cells so that
    predictions differ between images (for the screenshot)."""
    import torch

    from bloodcell.models import create_model, save_model
    from bloodcell.transforms import to_tensor
    torch.manual_seed(0)
    model = create_model("cnn3", len(CLASSES), 64)
    if train_steps:
        x = np.stack([synthetic_cell(k % 8, 64, seed=k) for k in range(160)])
        y = torch.tensor([k % 8 for k in range(160)])
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        model.train()
        for _ in range(train_steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(to_tensor(x)), y).backward()
            opt.step()
    save_model(model.eval(), {"architecture": "cnn3", "classes": CLASSES, "image_size": 64,
                              "description": "tiny synthetic test model"}, out)
    return out


def write_cells(folder: Path, labels, size: int = 96, seed: int = 0) -> list[Path]:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, lab in enumerate(labels):
        p = folder / f"cell_{i:02d}_{CLASSES[lab]}.png"
        Image.fromarray(synthetic_cell(lab, size, seed=seed + i)).save(p)
        paths.append(p)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not t.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


@contextlib.contextmanager
def chrome(width=1440, height=1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="bloodcell-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
              f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, cond, timeout=90, msg=""):  # generous: CI boxes can be busy
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond, msg)


def _cards(driver):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, "#grid .card")


def _diff_counts(driver) -> dict:
    # read in one script: the table is re-rendered on every change (no stale elements)
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#diff-table tbody tr')]"
        ".map(tr => [tr.dataset.class, Number(tr.querySelector('.diff-n').textContent)]))")


def _upload(driver, paths):
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))


needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium not installed (apt-get install chromium chromium-driver)")


@needs_chromium
def test_page_upload_correct_reload(tmp_path):
    pytest.importorskip("selenium")
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from bloodcell.serve import create_app
    model_dir = tiny_model(tmp_path / "model")
    images = write_cells(tmp_path / "imgs", [0, 3, 6])
    junk = tmp_path / "imgs" / "notes.txt"
    junk.write_text("not an image")
    gray = tmp_path / "imgs" / "gray.png"  # classified, but flagged by the input checks
    from PIL import Image
    Image.fromarray(np.full((96, 96, 3), 150, np.uint8)).save(gray)
    db = tmp_path / "lab.sqlite3"
    app = create_app(model=str(model_dir), db_path=db, screen=None)
    with live_server(app) as url, chrome() as driver:
        driver.get(url + "/")
        _wait(driver, lambda d: d.find_element(By.ID, "sample-select"), msg="page did not load")
        _upload(driver, images + [junk, gray])
        _wait(driver, lambda d: len(_cards(d)) == 4, msg="grid did not show 4 cells")
        _wait(driver, lambda d: "notes.txt" in d.find_element(By.ID, "errors").text,
              msg="the non-image got no error message")
        names = [c.find_element(By.CSS_SELECTOR, ".card-class-name").text for c in _cards(driver)]
        assert all(n in CLASSES for n in names), names
        before = _diff_counts(driver)
        # as `bloodcell predict`: the unusual input is not counted until it is reviewed
        assert sum(before.values()) == 3
        assert driver.find_element(By.ID, "diff-total").text == "3"
        assert "1 flagged not counted until reviewed" in driver.find_element(By.ID, "diff-summary").text
        assert driver.find_element(By.ID, "n-unusual").text == "1"
        # the page and the server count alike
        sid = httpx.get(f"{url}/api/samples").json()["samples"][0]["id"]
        server = httpx.get(f"{url}/api/samples/{sid}").json()["differential"]
        assert server["counts"] == before and server["n_left_out"] == 1
        # the 95 % interval column: the same Wilson interval as `bloodcell predict` prints
        from bloodcell.differential import proportion_ci
        cls = next(c for c, k in before.items() if k)
        ci = driver.find_element(By.CSS_SELECTOR, f'#diff-table tr[data-class="{cls}"] td.ci').text
        assert ci == "–".join(f"{100 * v:.1f}" for v in proportion_ci(before[cls], 3))
        flagged = [c for c in _cards(driver) if "unusual input" in c.text]
        assert len(flagged) == 1 and "gray.png" in flagged[0].text

        # open the first counted cell, correct it by key press to a class it was not predicted as
        i = next(i for i, c in enumerate(_cards(driver)) if "unusual input" not in c.text)
        first = _cards(driver)[i]
        cell_id = first.get_attribute("data-cell-id")
        predicted = names[i]
        target = next(c for c in CLASSES if c != predicted)
        first.click()
        _wait(driver, lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is not None,
              msg="viewer did not open")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#v-top3 li")) == 3
        driver.find_element(By.ID, "v-show-sal").click()  # saliency overlay loads
        _wait(driver, lambda d: d.execute_script(
            "const i = document.getElementById('v-sal'); return i.complete && i.naturalWidth > 0"),
            msg="saliency overlay did not load")
        driver.find_element(By.TAG_NAME, "body").send_keys(str(CLASSES.index(target) + 1))
        _wait(driver, lambda d: _diff_counts(d)[target] == before[target] + 1,
              msg="differential did not update after the correction")
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        driver.save_screenshot(str(tmp_path / "after_correction.png"))

        # confirming the flagged cell (Enter) puts it in the count under its class
        gray_pred = flagged[0].find_element(By.CSS_SELECTOR, ".card-class-name").text
        counts = _diff_counts(driver)
        flagged[0].click()
        _wait(driver, lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is not None,
              msg="viewer did not open")
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)
        _wait(driver, lambda d: sum(_diff_counts(d).values()) == 4, msg="the reviewed cell was not counted")
        assert _diff_counts(driver)[gray_pred] == counts[gray_pred] + 1
        assert "flagged" not in driver.find_element(By.ID, "diff-summary").text
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        server = httpx.get(f"{url}/api/samples/{sid}").json()["differential"]
        assert server["counts"] == _diff_counts(driver) and server["n_left_out"] == 0

        # the correction is in the database, and survives a page reload
        r = httpx.get(f"{url}/api/cells/{cell_id}")
        assert r.json()["true_class"] == target
        driver.refresh()
        _wait(driver, lambda d: len(_cards(d)) == 4, msg="cells not shown after reload")
        card = driver.find_element(By.CSS_SELECTOR, f'#grid .card[data-cell-id="{cell_id}"]')
        assert card.find_element(By.CSS_SELECTOR, ".card-class-name").text == target
        assert "corrected" in card.text
        after = _diff_counts(driver)
        assert after == server["counts"]
        assert after[target] - (gray_pred == target) == before[target] + 1
        assert after[predicted] - (gray_pred == predicted) == before[predicted] - 1

        # filters: by flag, then by class
        visible = "return [...document.querySelectorAll('#grid .card')].filter(c => !c.hidden).length"
        driver.find_element(By.CSS_SELECTOR, '#flag-filters [data-flag="corrected"]').click()
        assert driver.execute_script(visible) == 2  # corrected + confirmed
        driver.find_element(By.CSS_SELECTOR, '#flag-filters [data-flag="unusual"]').click()
        assert driver.execute_script(visible) == 1
        driver.find_element(By.CSS_SELECTOR, '#flag-filters [data-flag="all"]').click()
        assert driver.execute_script(visible) == 4
        Select(driver.find_element(By.ID, "class-filter")).select_by_value(target)
        assert driver.execute_script(visible) == after[target]
        # the white-cell basis: as the server's (and `bloodcell predict`'s) leukocyte differential
        driver.find_element(By.ID, "diff-wbc").click()
        wbc = httpx.get(f"{url}/api/samples/{sid}").json()["differential"]["white_cells"]
        pct = driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#diff-table tbody tr')]"
            ".map(tr => [tr.dataset.class, tr.children[2].textContent]))")
        assert driver.find_element(By.ID, "diff-total").text == str(wbc["n_white"])
        for c, v in wbc["percent"].items():
            assert pct[c] == f"{v:.1f}"
        assert pct["platelet"] == "–"
        driver.find_element(By.ID, "diff-wbc").click()
        driver.save_screenshot(str(tmp_path / "page.png"))
        # the page itself logged no errors (CSP violations, JS exceptions, failed loads)
        severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    assert (tmp_path / "page.png").stat().st_size > 10_000


@needs_chromium
def test_page_with_the_bundled_model_on_real_cells(real_test_split, shared_cache, tmp_path):
    """The page as it ships (bundled model through ONNX, bundled multi-cell screen) on
    2 held-out real cells of each class: the cards show the right classes, confidently,
    and the differential table holds every class, as the server counts them."""
    pytest.importorskip("selenium")
    import httpx
    from selenium.webdriver.common.by import By

    from bloodcell.serve import create_app
    by_class: dict = {}
    for path, cls in real_test_split:
        by_class.setdefault(cls, []).append(path)
    cells = {p.name: cls for cls in CLASSES for p in by_class[cls][:2]}
    app = create_app(db_path=tmp_path / "lab.sqlite3")
    with live_server(app) as url, chrome() as driver:
        assert httpx.get(f"{url}/api/health").json()["backend"] == BUNDLED_BACKEND
        driver.get(url + "/")
        _wait(driver, lambda d: d.find_element(By.ID, "sample-select"), msg="page did not load")
        _upload(driver, [p for cls in CLASSES for p in by_class[cls][:2]])
        _wait(driver, lambda d: len(_cards(d)) == 16, msg="grid did not show 16 cells")
        shown = {c.find_element(By.CSS_SELECTOR, ".fname").text:
                 c.find_element(By.CSS_SELECTOR, ".card-class-name").text for c in _cards(driver)}
        assert sum(shown[name] == cls for name, cls in cells.items()) >= 14, (shown, cells)
        assert int(driver.find_element(By.ID, "n-review").text) <= 3  # confident answers
        counts = _diff_counts(driver)
        assert sum(k > 0 for k in counts.values()) >= 7, counts  # a mixed differential
        sid = httpx.get(f"{url}/api/samples").json()["samples"][0]["id"]
        assert httpx.get(f"{url}/api/samples/{sid}").json()["differential"]["counts"] == counts
        severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe


@needs_chromium
def test_long_sample_name_does_not_widen_the_page(tmp_path):
    """A 200-character sample name: shown cut short (full name on hover), the header and
    its export buttons stay inside a 1280 px window (it used to widen the page to 2,775 px)."""
    pytest.importorskip("selenium")
    import httpx
    from selenium.webdriver.common.by import By

    from bloodcell.serve import create_app
    model_dir = tiny_model(tmp_path / "model")
    (img,) = write_cells(tmp_path / "imgs", [2])
    long_name = "Patient " + "0123456789" * 19 + "xy"
    assert len(long_name) == 200
    app = create_app(model=str(model_dir), db_path=tmp_path / "lab.sqlite3", screen=None)
    fits = ("const w = window.innerWidth; return [document.documentElement.scrollWidth <= w,"
            " ...['export-csv', 'export-zip', 'sample-select'].map("
            "id => document.getElementById(id).getBoundingClientRect().right <= w)]")
    with live_server(app) as url, chrome(1280, 800) as driver:
        with open(img, "rb") as f:
            r = httpx.post(f"{url}/api/predict", files=[("files", ("a.png", f, "image/png"))],
                           data={"sample": long_name})
        assert r.status_code == 200 and r.json()["sample"] == long_name
        driver.get(url + "/")
        _wait(driver, lambda d: len(_cards(d)) == 1, msg="the sample's cell was not shown")
        sel = driver.find_element(By.ID, "sample-select")
        assert driver.execute_script(fits) == [True, True, True, True]
        assert sel.get_attribute("title") == long_name  # the full name on hover
        opt = sel.find_element(By.CSS_SELECTOR, "option")
        assert opt.get_attribute("title") == long_name and len(opt.text) < 60
        # a long name typed as a new sample: the same
        driver.find_element(By.ID, "new-sample-name").send_keys(long_name.replace("Patient", "Other") + "\n")
        _wait(driver, lambda d: "(new)" in d.find_element(By.ID, "sample-select").text)
        assert driver.execute_script(fits) == [True, True, True, True]
        assert driver.find_element(By.ID, "sample-select").get_attribute("title").startswith("Other 0123")


@needs_chromium
def test_empty_lab_loads_example_cells(tmp_path):
    """A new user's first click: the bundled model classifies the 16 bundled cells."""
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By

    from bloodcell.serve import EXAMPLES_SAMPLE, create_app
    app = create_app(db_path=tmp_path / "lab.sqlite3")  # the bundled model and screen
    with live_server(app) as url, chrome() as driver:
        driver.get(url + "/")
        button = _wait(driver, lambda d: d.find_element(By.ID, "load-examples"))
        _wait(driver, lambda d: button.is_displayed(), msg="no example button in the empty lab")
        assert _cards(driver) == []
        button.click()
        _wait(driver, lambda d: len(_cards(d)) == 16, 120, msg="the 16 example cells were not shown")
        _wait(driver, lambda d: "Classified 16 example cells" in d.find_element(By.ID, "status").text)
        shown = [(c.find_element(By.CSS_SELECTOR, ".fname").text,
                  c.find_element(By.CSS_SELECTOR, ".card-class-name").text) for c in _cards(driver)]
        # file names are <true class>/<file>: the real model gets (nearly) all of them right
        right = sum(name.split("/")[0] == cls for name, cls in shown)
        assert right >= 15, shown
        assert sum(_diff_counts(driver).values()) == int(driver.find_element(By.ID, "diff-total").text)
        assert int(driver.find_element(By.ID, "diff-total").text) >= 14  # single cells: counted
        assert EXAMPLES_SAMPLE in driver.find_element(By.ID, "sample-select").text
        assert not driver.find_element(By.ID, "examples").is_displayed()  # only in an empty sample
        driver.refresh()  # stored like any upload
        _wait(driver, lambda d: len(_cards(d)) == 16, msg="the example sample did not persist")
        severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe


def make_screenshot(out: Path) -> None:
    """The README screenshots: the 16 example cells shipped with bloodcell (PBC dataset,
    CC BY 4.0), loaded with the empty lab's button and classified by the bundled model
    and screen, two confirmed; then one cell open in the viewer with its saliency
    overlay (``<out>_viewer.png``)."""
    from selenium.webdriver.common.by import By

    from bloodcell.serve import create_app
    with tempfile.TemporaryDirectory() as td:
        app = create_app(db_path=Path(td) / "lab.sqlite3")
        with live_server(app) as url, chrome(1400, 900) as driver:
            driver.get(url + "/")
            button = _wait(driver, lambda d: d.find_element(By.ID, "load-examples"))
            _wait(driver, lambda d: button.is_displayed())
            button.click()
            _wait(driver, lambda d: len(_cards(d)) == 16, 120)
            _wait(driver, lambda d: d.execute_script(
                "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth)"))
            for i in (1, 4):
                _cards(driver)[i].click()
                time.sleep(0.3)
                driver.find_element(By.TAG_NAME, "body").send_keys("\n")  # confirm
                driver.find_element(By.TAG_NAME, "body").send_keys("\ue00c")  # Esc
                time.sleep(0.2)
            _save_small(driver, out)
            _cards(driver)[10].click()
            driver.find_element(By.ID, "v-show-sal").click()
            _wait(driver, lambda d: d.execute_script(
                "const i = document.getElementById('v-sal'); return i.complete && i.naturalWidth > 0"))
            time.sleep(0.3)
            _save_small(driver, out.with_name(out.stem + "_viewer.png"))


def _save_small(driver, out: Path) -> None:
    """Screenshot as a 256-colour PNG (a fraction of the size, same look)."""
    from PIL import Image

    from bloodcell.data import atomic_write_bytes
    im = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    buf = io.BytesIO()
    im.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(buf, "PNG", optimize=True)
    atomic_write_bytes(out, buf.getvalue())
    out.chmod(0o644)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--screenshot", required=True, type=Path)
    make_screenshot(ap.parse_args().screenshot)
