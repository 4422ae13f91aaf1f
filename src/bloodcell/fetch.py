"""``bloodcell fetch-data``: download the PBC archive, verify it, unpack it safely,
and report what arrived (class counts, skipped junk)."""
from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger("bloodcell")

# Mendeley Data, "A dataset for microscopic peripheral blood cell images..." (CC BY 4.0),
# doi:10.17632/snkd93bnjr.1 -- the public zip of version 1.
PBC_URL = "https://data.mendeley.com/public-api/zip/snkd93bnjr/download/1"
PBC_PAGE = "https://data.mendeley.com/datasets/snkd93bnjr/1"


def download(url: str, dest: Path, progress: bool = True, timeout: float = 60) -> str:
    """Stream ``url`` to ``dest`` (atomically) with a progress bar; return its sha256."""
    from tqdm import tqdm
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="downloading",
                      disable=not progress) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        tmp.replace(dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConnectionError(f"could not download {url}: {e}. Download it by hand from "
                              f"{PBC_PAGE} and pass --archive FILE") from None
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    from .data import file_digest
    return file_digest(path, "sha256")


def _safe_target(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ValueError(f"archive member {name!r} points outside the target folder; refusing it")
    return target


def unpack(archive: Path, out: Path) -> None:
    """Unpack zip or tar (nested zips inside are unpacked too), refusing path traversal."""
    _extract(archive, out)
    # Mendeley's download wraps the dataset zip in another zip
    for _ in range(3):
        inner = list(out.rglob("*.zip"))
        if not inner:
            break
        for z in inner:
            _extract(z, z.parent)
            z.unlink()


def _extract(archive: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for m in z.infolist():
                _safe_target(out, m.filename)
            z.extractall(out)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                _safe_target(out, m.name)
                if m.issym() or m.islnk():
                    raise ValueError(f"archive member {m.name!r} is a link; refusing it")
            t.extractall(out)
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")


def find_dataset_root(top: Path) -> Path:
    """The folder whose sub-folders hold the images (the archive nests it)."""
    from .data import IMAGE_EXTENSIONS
    best, best_n = None, 0
    for d in [top, *[p for p in top.rglob("*") if p.is_dir()]]:
        subs = [s for s in d.iterdir() if s.is_dir() and not s.name.startswith((".", "__"))]
        n = sum(1 for s in subs if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in s.iterdir()))
        if n > best_n:
            best, best_n = d, n
    if best is None or best_n < 2:
        raise ValueError(f"{top}: no folder of class sub-folders with images found in the archive")
    return best


def fetch_data(out: str | Path, url: str = PBC_URL, sha256: str | None = None,
               archive: str | Path | None = None, progress: bool = True) -> dict:
    """Download (or take ``archive``), check, unpack into ``out``; return the summary."""
    from .data import scan
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="bloodcell-fetch-") as tmpd:
        if archive:
            arch = Path(archive)
            if not arch.is_file():
                raise FileNotFoundError(f"archive not found: {arch}")
            digest = sha256_file(arch)
        else:
            arch = Path(tmpd) / "pbc-archive"
            digest = download(url, arch, progress=progress)
        if sha256 and digest.lower() != sha256.lower():
            raise ValueError(f"checksum mismatch for {archive or url}: sha256 {digest}, "
                             f"expected {sha256}; the file is corrupt or not the PBC archive")
        staging = Path(tmpd) / "unpacked"
        unpack(arch, staging)
        root = find_dataset_root(staging)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty; choose another --out")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(root), str(out))
    ds = scan(out)
    return {"path": str(out), "sha256": digest, "verified": bool(sha256),
            "n_images": len(ds), "class_counts": ds.class_counts(), "skipped": ds.skipped}
