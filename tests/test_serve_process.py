"""`bloodcell serve` as a real process on a loopback port: kill -9 during a burst of
uploads and corrections loses no acknowledged write and leaves nothing half-written;
after the restart, SIGTERM stops it cleanly (exit 0), with the database checkpointed
into the main file (a copy of lab.db alone has every write)."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import CLASSES, synthetic_cell

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bloodcell.models import create_model, save_model
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    save_model(create_model("cnn3", 8, 64), {"architecture": "cnn3", "classes": CLASSES,
                                             "image_size": 64}, d)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bloodcell.cli", "serve", "--model", str(model_dir), "--db", str(db),
         "--port", str(port), "--no-screen", "--backend", "torch", "--threads", "1",
         "--log-level", "warning"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")


def png(seed: int) -> bytes:
    b = io.BytesIO()
    Image.fromarray(synthetic_cell(seed % 8, 48, seed=seed)).save(b, "PNG")
    return b.getvalue()


class Burst:
    """Client threads uploading pairs of images and correcting each new cell once; what
    the server acknowledged (200) is recorded, what it never answered is noted too."""

    def __init__(self, url: str, n_threads: int = 4, per_thread: int = 40):
        self.url, self.n_threads, self.per_thread = url, n_threads, per_thread
        self.lock = threading.Lock()
        self.uploads: dict[str, dict] = {}        # file name -> {sha1, cell_id or None, acked}
        self.requests: list[tuple[str, str]] = []  # the two file names of each upload sent
        self.corrections: dict[str, tuple[str, bool]] = {}  # cell id -> (class, acked)
        self.n_acked = 0
        self.refused = 0  # answered, but not with 200 (the server may say it is busy)
        self.errors: list[str] = []

    def run_thread(self, t: int):
        try:
            self._run(t)
        except Exception as e:  # noqa: BLE001 - a thread's failure must reach the test, not vanish
            with self.lock:
                self.errors.append(f"thread {t}: {e!r}")

    def _run(self, t: int):
        with httpx.Client(base_url=self.url, timeout=30) as c:
            for k in range(self.per_thread):
                names = [f"t{t}_k{k}_{j}.png" for j in (0, 1)]
                datas = [png(1000 * t + 10 * k + j) for j in (0, 1)]
                with self.lock:
                    self.requests.append((names[0], names[1]))
                    for n, d in zip(names, datas):
                        self.uploads[n] = {"sha1": hashlib.sha1(d).hexdigest(), "cell_id": None, "acked": False}
                try:
                    r = c.post("/api/predict", files=[("files", (n, d, "image/png")) for n, d in zip(names, datas)],
                               data={"sample": f"burst {t}"})
                except httpx.HTTPError:
                    return  # the server is gone: this request was never acknowledged
                if r.status_code != 200:  # e.g. 503 busy: refused, so not acknowledged either
                    with self.lock:
                        self.refused += 1
                    continue
                res = r.json()["results"]
                assert [x["status"] for x in res] == ["ok", "ok"], res
                with self.lock:
                    for n, x in zip(names, res):
                        self.uploads[n].update(cell_id=x["cell_id"], acked=True)
                    self.n_acked += 1
                cid, cls = res[0]["cell_id"], CLASSES[(t + k) % 8]
                with self.lock:
                    self.corrections[cid] = (cls, False)
                try:
                    r = c.put(f"/api/cells/{cid}/correction", json={"true_class": cls})
                except httpx.HTTPError:
                    return
                if r.status_code != 200:
                    with self.lock:
                        self.refused += 1
                    continue
                with self.lock:
                    self.corrections[cid] = (cls, True)
                    self.n_acked += 1


def test_kill_9_during_a_burst_loses_no_acknowledged_write(model_dir, tmp_path):
    db, log = tmp_path / "lab.db", tmp_path / "server.log"
    proc, url = start_server(model_dir, db, log)
    burst = Burst(url)
    threads = [threading.Thread(target=burst.run_thread, args=(t,)) for t in range(burst.n_threads)]
    try:
        for th in threads:
            th.start()
        deadline = time.time() + 120
        while burst.n_acked < 24 and time.time() < deadline and any(th.is_alive() for th in threads):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        for th in threads:
            th.join(60)
    assert not burst.errors, burst.errors
    acked = {n: u for n, u in burst.uploads.items() if u["acked"]}
    assert len(acked) >= 24, "the burst did not get going before the kill"
    # each thread stops at its first unanswered request (an upload or a correction), so a
    # kill mid-burst leaves at least one request never acknowledged
    unacked = (len(burst.uploads) - len(acked)) + sum(not ok for _, ok in burst.corrections.values())
    assert unacked > 0, "the kill came after the burst: nothing was in flight"
    assert len(burst.requests) < burst.n_threads * burst.per_thread, "the burst had finished"

    proc, url = start_server(model_dir, db, log)  # restart on the same database
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            stored = {}
            for s in c.get("/api/samples").json()["samples"]:
                for cell in c.get(f"/api/samples/{s['id']}").json()["cells"]:
                    stored[cell["file_name"]] = cell
            for name, u in acked.items():  # every acknowledged upload, with its very bytes
                assert name in stored and stored[name]["id"] == u["cell_id"], name
                img = c.get(f"/api/cells/{u['cell_id']}/image").content
                assert hashlib.sha1(img).hexdigest() == u["sha1"], name
            for cid, (cls, ok) in burst.corrections.items():
                got = c.get(f"/api/cells/{cid}").json()
                if ok:  # acknowledged: there; not acknowledged: there or not, but whole
                    assert got["true_class"] == cls and [h["true_class"] for h in got["corrections"]] == [cls]
                else:
                    assert got.get("true_class") in (None, cls)
            for a, b in burst.requests:  # an upload is stored whole or not at all
                assert (a in stored) == (b in stored), (a, b)
    finally:
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C: a clean stop (it used to exit 143)
        rc = proc.wait(60)
    assert rc == 0, (rc, log.read_text()[-2000:])
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed into lab.db
    # a backup that copies only lab.db has everything; nothing in it is half-written
    copy = tmp_path / "copy" / "lab.db"
    copy.parent.mkdir()
    copy.write_bytes(db.read_bytes())
    con = sqlite3.connect(copy)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in con.execute("SELECT id FROM cells")}
        assert {u["cell_id"] for u in acked.values()} <= ids
        # each cell's class is its last logged correction (no half-applied correction)
        bad = con.execute("SELECT c.id FROM cells c JOIN corrections k ON k.cell_id = c.id WHERE k.id = "
                          "(SELECT MAX(id) FROM corrections WHERE cell_id = c.id) "
                          "AND c.true_class IS NOT k.true_class").fetchall()
        assert bad == []
    finally:
        con.close()
