import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.transforms import MAX_PIXELS, Augment, ImageError, Normalize, open_image, preprocess, to_tensor
from conftest import synthetic_cell


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def rgb():
    return Image.fromarray(synthetic_cell(3, size=80))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_every_mode_becomes_rgb(rgb, mode):
    im = rgb.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(rgb.convert("L"), np.uint16) * 257)
    assert im.mode == mode
    out = preprocess(im, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert 20 < out.mean() < 250  # not black/blank: scaling of 16-bit and alpha handled


def test_16bit_png_file_scaled_not_clipped(tmp_path, rgb):
    a = np.asarray(rgb.convert("L"), np.uint16) * 257
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    out = preprocess(p, 40)
    ref = preprocess(rgb.convert("L"), 40)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3


def test_rgba_transparent_composited_on_white():
    a = np.zeros((20, 20, 4), np.uint8)  # fully transparent black
    out = preprocess(a, 20)
    assert out.min() == 255


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    shown = open_image(p)
    assert shown.size == (40, 80)  # width/height swapped by the orientation tag
    arr = np.asarray(shown)
    assert arr[:40].mean() > 200 and arr[40:].mean() < 60  # white half now on top


def test_centre_crop_keeps_centre():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 200
    out = preprocess(a, 50)
    assert out.mean() > 190  # only the centre square survives


def test_jpeg_draft_same_path_for_bytes_and_file(tmp_path, rgb):
    data = _encode(rgb.resize((360, 363)), "JPEG", quality=90)
    p = tmp_path / "x.jpg"
    p.write_bytes(data)
    assert np.array_equal(preprocess(p, 64), preprocess(data, 64))


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"hello, I am text", "not an image"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "corrupt or truncated"),
])
def test_bad_bytes_named_reason(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError) as e:
        preprocess(p, 32)
    assert reason in e.value.reason and str(p) in str(e.value)


def test_truncated_jpeg(tmp_path, rgb):
    data = _encode(rgb.resize((300, 300)), "JPEG")
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        preprocess(p, 32)


def test_missing_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        preprocess(tmp_path / "nope.png", 32)
    with pytest.raises(ImageError, match="folder"):
        preprocess(tmp_path, 32)


def test_decompression_bomb_refused(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    p = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(p)  # tiny file, huge canvas
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageError, match="decompression bomb"):
            preprocess(p, 32)


def test_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch):
    """A good image the user may not read (permissions) must not read as corrupt: they
    might delete it. (Open refused by the OS, simulated: root reads any file.)"""
    p = tmp_path / "locked.png"
    Image.fromarray(synthetic_cell(1, 32)).save(p)

    def refuse(fp, *a, **k):
        raise PermissionError(13, "Permission denied", str(fp))
    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageError, match="cannot read the file .Permission denied.") as e:
        preprocess(p, 32)
    assert "corrupt" not in str(e.value) and "locked.png" in str(e.value)


def test_bad_array_shape():
    with pytest.raises(ImageError, match="shape"):
        preprocess(np.zeros((10, 10, 2), np.uint8), 8)
    float01 = np.full((16, 16, 3), 0.5, np.float32)
    assert preprocess(float01, 16).mean() == pytest.approx(127.5, abs=1)


def test_to_tensor_and_normalize():
    batch = np.stack([synthetic_cell(i, 32) for i in range(4)])
    t = to_tensor(batch)
    assert t.shape == (4, 3, 32, 32) and t.dtype == torch.float32
    assert torch.equal(t[1, 0], torch.from_numpy(batch[1, :, :, 0]).float())
    n = Normalize((0.5,) * 3, (0.5,) * 3)(t)
    assert n.min() >= -1 and n.max() <= 1


def test_augment_train_only_and_changes_pixels():
    torch.manual_seed(0)
    x = to_tensor(np.stack([synthetic_cell(i, 48) for i in range(6)]))
    aug = Augment(flip=True, rotation=0.4, scale=0.1, color=0.2)
    aug.eval()
    assert torch.equal(aug(x), x)
    aug.train()
    y = aug(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert y.min() >= 0 and y.max() <= 255
    # reflection fill: no black corners appear after rotation
    assert y[:, :, 0, 0].min() > 50
