import numpy as np
import pytest

from bloodcell import data as D
from conftest import CLASSES


def test_scan_skips_junk_with_reasons(synthetic_dataset):
    ds = D.scan(synthetic_dataset)
    assert ds.classes == sorted(ds.classes) and len(ds.classes) == 8
    reasons = {s["path"]: s["reason"] for s in ds.skipped}
    assert "hidden" in reasons["neutrophil/.DS_000.jpg"]
    assert "empty" in reasons["platelet/empty.jpg"]
    assert "extension" in reasons["basophil/notes.txt"]
    # the broken JPEG has a good name: only decoding finds it
    assert "eosinophil/broken.jpg" in [s.path for s in ds.samples]
    images, info = D.load_images(ds, 32)
    assert "eosinophil/broken.jpg" not in [s.path for s in ds.samples]
    assert any(s["path"] == "eosinophil/broken.jpg" for s in ds.skipped)
    assert len(images) == len(ds) == 96 and images.shape[1:] == (32, 32, 3)


def test_scan_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.scan(tmp_path / "missing")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(NotADirectoryError):
        D.scan(tmp_path / "f.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.scan(tmp_path / "empty")
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        D.scan(tmp_path / "empty")


def test_split_stratified_reproducible(synthetic_dataset):
    ds = D.scan(synthetic_dataset)
    s1, s2 = D.make_split(ds, seed=42), D.make_split(ds, seed=42)
    assert s1 == s2 and D.make_split(ds, seed=1) != s1
    labels = ds.labels
    for split, frac in zip(D.SPLITS, D.DEFAULT_FRACTIONS):
        idx = D.split_indices(s1, split)
        counts = np.bincount(labels[idx], minlength=8)
        assert counts.min() >= 1  # every class in every split
        assert abs(len(idx) / len(ds) - frac) < 0.06


def test_split_independent_of_listing_order(synthetic_dataset):
    ds = D.scan(synthetic_dataset)
    s = dict(zip([x.path for x in ds.samples], D.make_split(ds)))
    rev = D.Dataset(ds.root, ds.classes, ds.samples[::-1])
    s_rev = dict(zip([x.path for x in rev.samples], D.make_split(rev)))
    assert s == s_rev


def test_manifest_roundtrip_and_missing_files(synthetic_dataset, tmp_path):
    ds = D.scan(synthetic_dataset)
    splits = D.make_split(ds)
    h = D.write_manifest(tmp_path / "split.csv", ds, splits)
    assert len(h) == 40
    m = D.read_manifest(tmp_path / "split.csv")
    assert D.apply_manifest(ds, m) == splits
    del m[ds.samples[0].path]
    with pytest.raises(ValueError, match="not in the split manifest"):
        D.apply_manifest(ds, m)


def test_cache_reused_and_invalidated(synthetic_dataset, tmp_path):
    from PIL import Image
    cache = tmp_path / "c"
    ds = D.scan(synthetic_dataset)
    a, info = D.load_images(ds, 24, cache, progress=False)
    assert info["built"]
    ds2 = D.scan(synthetic_dataset)
    b, info2 = D.load_images(ds2, 24, cache, progress=False)
    assert not info2["built"] and np.array_equal(np.asarray(a), np.asarray(b))
    # change one file's content -> new cache key -> rebuilt with the new pixels
    p = synthetic_dataset / "basophil" / "basophil_0.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(p)
    ds3 = D.scan(synthetic_dataset)
    c, info3 = D.load_images(ds3, 24, cache, progress=False)
    assert info3["built"]
    i = [s.path for s in ds3.samples].index("basophil/basophil_0.png")
    assert c[i, :, :, 2].mean() > 250 and c[i, :, :, 0].mean() < 5


def test_atomic_write_leaves_no_partial(tmp_path):
    p = tmp_path / "out.json"
    D.atomic_write_json(p, {"a": 1})
    assert p.read_text().strip().startswith("{")
    assert [f.name for f in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_that_fails_half_way_keeps_the_old_file(tmp_path):
    """A write that dies half-way (here: the file-size limit is reached, EFBIG, in a child
    process) leaves the previous file whole and no temporary file behind. Fails if
    atomic_write_bytes writes in place (Path.write_bytes truncates the old file, then
    stops with part of the new one)."""
    import errno
    import subprocess
    import sys
    import textwrap
    target = tmp_path / "results.json"
    target.write_text('{"old": true}\n')
    script = textwrap.dedent(f"""
        import resource, signal
        from bloodcell.data import atomic_write_bytes, atomic_write_json
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        for write, data in ((atomic_write_bytes, b"x" * 100_000), (atomic_write_json, ["y" * 100] * 1000)):
            try:
                write({str(target)!r}, data)
            except OSError as e:
                print("failed:", e.errno)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["failed:", str(errno.EFBIG)] * 2  # both writers hit the limit
    assert target.read_text() == '{"old": true}\n'
    assert [f.name for f in tmp_path.iterdir()] == ["results.json"]


def test_scan_names_folders_that_are_not_classes(synthetic_dataset, caplog):
    (synthetic_dataset / "weird").mkdir()
    ds = D.scan(synthetic_dataset, classes=["basophil", "ig"])
    assert set(ds.classes) == {"basophil", "ig"}
    assert "weird" in caplog.text and "left out" in caplog.text


def test_manifest_without_rows(tmp_path):
    p = tmp_path / "split.csv"
    p.write_text("path,class,split\n")
    with pytest.raises(ValueError, match="lists no files"):
        D.read_manifest(p)
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a split manifest"):
        D.read_manifest(p)


def test_macro_f1_counts_only_the_classes_present():
    from bloodcell.evaluate import compute_metrics
    classes = ["a", "b", "c", "d"]
    y = np.array([0, 0, 1, 1])
    m = compute_metrics(y, np.eye(4)[[0, 0, 1, 1]], classes)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["macro_f1_classes"] == ["a", "b"]
    m = compute_metrics(y, np.eye(4)[[0, 2, 1, 1]], classes)  # one image called an absent class
    assert m["accuracy"] == 0.75 and m["macro_f1"] < 1.0


def test_manifest_and_split_problems_are_named(tmp_path, caplog):
    from PIL import Image as _I
    root = tmp_path / "d"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(5):
            _I.new("RGB", (8, 8), (i * 40, 80, 120)).save(root / c / f"{c}_{i}.png")
    ds = D.scan(root)
    man = tmp_path / "split.csv"
    D.write_manifest(man, ds, D.make_split(ds, (0.6, 0.2, 0.2), 0))
    text = man.read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text(text.replace(",val,", ",validation,"))
    with pytest.raises(ValueError, match="split 'validation' is not one of train, val, test"):
        D.read_manifest(bad)
    relabelled = tmp_path / "relabelled.csv"
    relabelled.write_text(text.replace("basophil/basophil_1.png,basophil,", "basophil/basophil_1.png,ig,"))
    with pytest.raises(ValueError, match="1 file.s. are in another class folder than the split manifest says"):
        D.apply_manifest(D.scan(root), D.read_manifest(relabelled))
    (root / "basophil" / "basophil_0.png").rename(root / "eosinophil" / "basophil_0.png")
    with pytest.raises(ValueError, match="not in the split manifest"):  # a path it does not know
        D.apply_manifest(D.scan(root), D.read_manifest(man))
    (root / "eosinophil" / "basophil_0.png").unlink()
    with caplog.at_level("WARNING", logger="bloodcell"):
        D.apply_manifest(D.scan(root), D.read_manifest(man))
    assert "1 file(s) of the split manifest are not in the data folder" in caplog.text
    for f in (root / "platelet").iterdir():
        f.unlink()
    (root / "platelet" / "x.png").write_bytes((root / "ig" / "ig_0.png").read_bytes())
    with pytest.raises(ValueError, match=r"fewer than 3 images: platelet \(1\)"):
        D.make_split(D.scan(root), (0.6, 0.2, 0.2), 0)
