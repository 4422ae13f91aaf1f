"""Data layer: scan a class-folder dataset, check every file once, split it
reproducibly, and cache decoded images so epochs never decode JPEGs again.

A dataset is ``ROOT/<class>/<image>``; class names are the sorted folder
names. Bad files are skipped (never fatal) and listed with a reason.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import stat
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .locate import Framing
from .transforms import PREPROCESS_VERSION, ImageError, preprocess

log = logging.getLogger("bloodcell")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)  # the study's 64/16/20
DEFAULT_SEED = 42


def default_cache_dir() -> Path:
    return Path(os.environ.get("BLOODCELL_CACHE", Path.home() / ".cache" / "bloodcell"))


def default_data_dir() -> Path | None:
    """``$BLOODCELL_DATA``, else ``../shared/data/pbc`` seen from the project root, if present."""
    env = os.environ.get("BLOODCELL_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base.parent / "shared" / "data" / "pbc"
        if p.is_dir():
            return p
    return None


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def csv_safe(text: str) -> str:
    """A CSV cell a spreadsheet shows as text instead of running it as a formula (a file
    named ``=HYPERLINK(...).jpg``, ``+cmd.jpg``, ``-2+3.jpg`` or ``@SUM(A1).jpg``, or one
    starting with a tab or carriage return): prefixed with ``'``, as OWASP advises. One
    guard for ``bloodcell predict --out x.csv`` and the lab page's CSV export."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class Sample:
    path: str        # relative to the dataset root, POSIX separators
    label: int
    sha1: str


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)   # {path, reason}

    def __len__(self):
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def paths(self) -> list[Path]:
        return [self.root / s.path for s in self.samples]

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


def subclass_labels(ds: Dataset, min_count: int = 20) -> tuple[list[str], np.ndarray]:
    """Finer labels from the file-name prefix inside each class folder, as
    "class/PREFIX". PBC names its files by sub-type (neutrophil: BNE_ band, SNE_
    segmented; ig: PMY_/MY_/MMY_ pro-/myelo-/metamyelocyte), and the band vs
    metamyelocyte boundary is where most errors are. Prefixes shared by fewer
    than ``min_count`` images fall back to "class/*", so arbitrary file names
    give one group per class. Used only as an auxiliary training target."""
    keys = []
    for smp in ds.samples:
        m = re.match(r"[A-Za-z]+", Path(smp.path).stem)
        keys.append(f"{ds.classes[smp.label]}/{m.group(0).upper() if m else '*'}")
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    keys = [k if counts[k] >= min_count else k.split("/")[0] + "/*" for k in keys]
    names = sorted(set(keys))
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[k] for k in keys], dtype=np.int64)


def file_digest(p: Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file's content, read in 1 MB chunks."""
    h = hashlib.new(algorithm)
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_image_files(root: Path):
    """Yield (path, reason_or_None) under ``root`` recursively, hidden junk flagged.
    Linked folders are followed (once each: a link loop cannot recur); a broken
    link or unreadable entry is reported, never fatal."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if fn.startswith("."):
                yield p, "hidden file (e.g. macOS metadata), not an image"
                continue
            try:
                st = p.stat()
            except OSError as e:
                yield p, ("broken link (its target does not exist)" if p.is_symlink()
                          else f"unreadable ({e.strerror or e})")
                continue
            if not stat.S_ISREG(st.st_mode):
                yield p, "not a regular file"
            elif p.suffix.lower() not in IMAGE_EXTENSIONS:
                yield p, f"not an image file extension ({p.suffix or 'none'})"
            elif st.st_size == 0:
                yield p, "empty file (0 bytes)"
            else:
                yield p, None


def scan(root: str | os.PathLike, classes: list[str] | None = None) -> Dataset:
    """List a class-folder dataset. Cheap checks here; files that fail to
    decode are found (once, cached) by ``load_images`` and moved to skipped."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    if not classes:
        raise ValueError(f"{root}: no class sub-folders found (expected ROOT/<class>/<image files>)")
    extra = sorted(set(found) - set(classes))
    if extra:
        log.warning("%s: folder(s) %s are not among the classes %s: their images are left out",
                    root, ", ".join(extra), ", ".join(classes))
    samples, skipped = [], []
    for label, cls in enumerate(classes):
        cdir = root / cls
        if not cdir.is_dir():
            log.warning("%s: class folder %r missing: no images of that class", root, cls)
            continue
        for p, reason in iter_image_files(cdir):
            rel = p.relative_to(root).as_posix()
            if reason:
                skipped.append({"path": rel, "reason": reason})
            else:
                samples.append(Sample(rel, label, file_digest(p)))
    if not samples:
        raise ValueError(f"{root}: no image files found in its class folders")
    ds = Dataset(root, list(classes), samples, skipped)
    _warn_skipped(ds.skipped, root)
    return ds


def _warn_skipped(skipped, root):
    if skipped:
        lines = "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped)
        log.warning("skipped %d file(s) under %s:\n%s", len(skipped), root, lines)


# ----------------------------------------------------------------------------- splits

def make_split(ds: Dataset, fractions=DEFAULT_FRACTIONS, seed: int = DEFAULT_SEED) -> list[str]:
    """Stratified, seeded split -> one of train/val/test per sample.

    Deterministic in the seed and the set of files (ordered by content hash,
    so renaming or re-listing the folder does not reshuffle the split)."""
    from sklearn.model_selection import train_test_split
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    if counts.min() < 3:  # the class each split needs at least one image of
        few = ", ".join(f"{c} ({n})" for c, n in zip(ds.classes, counts) if n < 3)
        raise ValueError(f"{ds.root}: class folder(s) with fewer than 3 images: {few}; a stratified split "
                         "needs one in each of train, val and test (remove the folder or add images)")
    order = sorted(range(len(ds)), key=lambda i: (ds.samples[i].sha1, ds.samples[i].path))
    idx = np.array(order)
    y = ds.labels[idx]
    train_f, val_f, test_f = fractions
    try:
        rest_idx, test_idx = train_test_split(idx, test_size=test_f, random_state=seed, stratify=y)
        y_rest = ds.labels[rest_idx]
        train_idx, val_idx = train_test_split(rest_idx, test_size=val_f / (train_f + val_f),
                                              random_state=seed, stratify=y_rest)
    except ValueError as e:  # sklearn's words alone do not say which folder or what to do
        raise ValueError(f"{ds.root}: {len(ds)} images in {len(ds.classes)} classes are too few for a "
                         f"stratified {'/'.join(f'{f:g}' for f in fractions)} split ({e})") from None
    out = [""] * len(ds)
    for name, ii in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        for i in ii:
            out[i] = name
    return out


def write_manifest(path: Path, ds: Dataset, splits: list[str]) -> str:
    """CSV: path, class, split, sha1. Returns the manifest's own sha1."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", "split", "sha1"])
    for s, sp in zip(ds.samples, splits):
        w.writerow([s.path, ds.classes[s.label], sp, s.sha1])
    text = buf.getvalue()
    atomic_write_text(path, text)
    return hashlib.sha1(text.encode()).hexdigest()


def read_manifest(path: Path) -> dict[str, tuple[str, str]]:
    """relative path -> (class, split)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if not {"path", "class", "split"} <= set(reader.fieldnames or []):
        raise ValueError(f"{path}: not a split manifest (need columns path,class,split)")
    if not rows:
        raise ValueError(f"{path}: the split manifest lists no files")
    bad = [(i, r["split"]) for i, r in enumerate(rows, start=2) if r["split"] not in SPLITS]
    if bad:  # a file in no known split would silently drop out of every one
        raise ValueError(f"{path}: line {bad[0][0]}: split {bad[0][1]!r} is not one of {', '.join(SPLITS)}"
                         + (f" ({len(bad)} such lines)" if len(bad) > 1 else ""))
    return {r["path"]: (r["class"], r["split"]) for r in rows}


def manifest_sha1(path: Path) -> str:
    return file_digest(Path(path))


def apply_manifest(ds: Dataset, manifest: dict[str, tuple[str, str]]) -> list[str]:
    """Split of each sample from a manifest; files the manifest lacks raise (a
    silently re-split dataset would leak test images into training)."""
    missing = [s.path for s in ds.samples if s.path not in manifest]
    if missing:
        raise ValueError(f"{len(missing)} file(s) of the data folder are not in the split manifest, e.g. "
                         f"{missing[:3]}: it was made for other files (a re-split would leak test "
                         "images into training)")
    wrong = [s.path for s in ds.samples if manifest[s.path][0] != ds.classes[s.label]]
    if wrong:
        raise ValueError(f"{len(wrong)} file(s) are in another class folder than the split manifest says, "
                         f"e.g. {wrong[:3]}")
    gone = len(manifest) - len(ds.samples)
    if gone > 0:
        log.warning("%d file(s) of the split manifest are not in the data folder (moved or deleted)", gone)
    return [manifest[s.path][1] for s in ds.samples]


def model_splits(ds: Dataset, train_args: dict, model_path=None, split_file=None) -> list[str]:
    """The split of ``ds`` a model was made with: an explicit manifest > the run's own
    split.csv > re-derived from the seed and fractions in the model's ``train_args``
    (the split is a pure function of seed + files). Used by evaluate, calibrate and
    export's int8 calibration."""
    if split_file is None and model_path is not None:
        p = Path(model_path)
        cand = (p if p.is_dir() else p.parent) / "split.csv"
        split_file = cand if cand.exists() else None
    if split_file is not None:
        return apply_manifest(ds, read_manifest(Path(split_file)))
    return make_split(ds, tuple(train_args.get("fractions", DEFAULT_FRACTIONS)),
                      int(train_args.get("split_seed", DEFAULT_SEED)))


def split_indices(splits: list[str], which: str) -> np.ndarray:
    if which == "all":
        return np.arange(len(splits))
    if which not in SPLITS:
        raise ValueError(f"unknown split {which!r}: use train, val, test or all")
    return np.array([i for i, s in enumerate(splits) if s == which], dtype=np.int64)


# ----------------------------------------------------------------------------- cache

def _decode_one(args):
    path, size, framing = args
    try:
        return preprocess(path, size, framing), None
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # never let one odd file kill a 12k-image build
        return None, f"could not decode ({type(e).__name__}: {e})"


def decode_many(paths: list[Path], size: int, workers: int | None = None, progress: bool = True,
                framing: Framing | None = None):
    """Decode+preprocess many files in parallel -> (uint8 array [N,S,S,3], reasons list)."""
    from tqdm import tqdm
    workers = workers or min(os.cpu_count() or 1, 8)
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    reasons: list[str | None] = [None] * len(paths)
    jobs = [(str(p), size, framing) for p in paths]
    bar = tqdm(total=len(jobs), desc=f"decoding {size}px", unit="img", disable=not progress,
               mininterval=1.0)
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as ex:
            for i, (arr, why) in enumerate(ex.map(_decode_one, jobs, chunksize=32)):
                if arr is not None:
                    out[i] = arr
                reasons[i] = why
                bar.update()
    else:
        for i, job in enumerate(jobs):
            arr, why = _decode_one(job)
            if arr is not None:
                out[i] = arr
            reasons[i] = why
            bar.update()
    bar.close()
    return out, reasons


def load_images(ds: Dataset, size: int, cache_dir: Path | None = None, progress: bool = True,
                framing: Framing | None = None):
    """Decoded uint8 images of ``ds`` at ``size``, from a memory-mapped cache.

    The cache is keyed by the files' content hashes, the size and the
    preprocessing version, so a changed or added file triggers a rebuild and
    the same images are shared by every run and every model. Files that fail
    to decode are removed from ``ds`` (moved to ``ds.skipped``) in place.
    Returns (array [N,S,S,3] uint8, info dict with timings)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    frame_key = f"framing={json.dumps(framing.to_dict(), sort_keys=True)}|" if framing else ""
    key_src = f"v{PREPROCESS_VERSION}|{size}|{frame_key}" + "|".join(s.sha1 for s in ds.samples)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:20]
    arr_path = cache_dir / f"images-{size}-{key}.npy"
    meta_path = cache_dir / f"images-{size}-{key}.json"
    t0 = time.perf_counter()
    if arr_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        images = np.load(arr_path, mmap_mode="r")
        built = False
    else:
        images, reasons = decode_many(ds.paths(), size, progress=progress, framing=framing)
        meta = {"bad": {s.path: r for s, r in zip(ds.samples, reasons) if r}, "size": size,
                "n": len(ds), "preprocess_version": PREPROCESS_VERSION}
        cache_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, images)
        atomic_write_bytes(arr_path, buf.getvalue())
        atomic_write_json(meta_path, meta)
        images = np.load(arr_path, mmap_mode="r")
        built = True
    seconds = time.perf_counter() - t0
    bad = meta["bad"]
    if bad:
        keep = [i for i, s in enumerate(ds.samples) if s.path not in bad]
        new_skips = [{"path": s.path, "reason": bad[s.path]} for s in ds.samples if s.path in bad]
        _warn_skipped(new_skips, ds.root)
        ds.skipped.extend(new_skips)
        ds.samples = [ds.samples[i] for i in keep]
        images = images[keep]
    info = {"cache_file": str(arr_path), "built": built, "seconds": round(seconds, 2),
            "n_images": len(ds), "size": size}
    log.info("image cache %s in %.1fs (%s)", "built" if built else "loaded", seconds, arr_path)
    return images, info
