import hashlib
import http.server
import threading
import zipfile
from functools import partial

import numpy as np
import pytest
from PIL import Image

from bloodcell.fetch import fetch_data, unpack


@pytest.fixture
def archive(tmp_path):
    """A small PBC-like zip nested the way the public download is."""
    src = tmp_path / "src" / "PBC_dataset_normal_DIB"
    for cls in ("basophil", "neutrophil"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / cls / f"{cls}{i}.jpg")
    (src / "neutrophil" / ".DS_1.jpg").write_bytes(b"junk")
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src.parent))
    outer = tmp_path / "serve" / "pbc.zip"
    outer.parent.mkdir()
    with zipfile.ZipFile(outer, "w") as z:
        z.write(inner, "PBC_dataset_normal_DIB.zip")
    return outer


@pytest.fixture
def http_url(archive):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/{archive.name}"
    srv.shutdown()


def test_fetch_from_local_http_server(archive, http_url, tmp_path):
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    s = fetch_data(tmp_path / "pbc", url=http_url, sha256=digest, progress=False)
    assert s["verified"] and s["n_images"] == 6
    assert s["class_counts"] == {"basophil": 3, "neutrophil": 3}
    assert [k["path"] for k in s["skipped"]] == ["neutrophil/.DS_1.jpg"]


def test_fetch_checksum_mismatch(http_url, tmp_path):
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch_data(tmp_path / "pbc", url=http_url, sha256="0" * 64, progress=False)
    assert not (tmp_path / "pbc").exists()


def test_fetch_unreachable(tmp_path):
    with pytest.raises(ConnectionError, match="could not download"):
        fetch_data(tmp_path / "pbc", url="http://127.0.0.1:9/nothing.zip", progress=False)


def test_unpack_refuses_path_traversal(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escape.txt", "x")
    with pytest.raises(ValueError, match="outside"):
        unpack(evil, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
