"""Cell-centred framing (bloodcell.locate, transforms.prepare) and the domain
augmentation (bloodcell.augment), on synthetic smears; the locator against the
hand-drawn masks of other labs' images when ../shared/data is there."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.augment import DomainAugment
from bloodcell.locate import CellBox, Framing, locate_image
from bloodcell.modelfile import ModelFile
from bloodcell.transforms import prepare, preprocess


def smear(size=256, nucleus=(128, 128, 28), background=(250, 225, 205), seed=0):
    """Pinkish background, pale red cells, one purple nucleus (cy, cx, r) with cytoplasm."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = background
    yy, xx = np.mgrid[:size, :size]
    for _ in range(10):
        cy, cx = rng.uniform(0, size, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.08) ** 2] = (225, 165, 165)
    if nucleus:
        cy, cx, r = nucleus
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (r * 1.4) ** 2] = (200, 190, 220)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = (85, 50, 140)
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_locator_finds_an_off_centre_nucleus_and_its_size():
    img = smear(nucleus=(100, 150, 25))  # centre (x=150, y=100) of 256, diameter 50
    box = locate_image(preprocess(img, 128))
    assert box.found
    assert abs(box.cx - 150 / 256) < 0.02 and abs(box.cy - 100 / 256) < 0.02
    assert abs(box.extent - 50 / 256) < 0.03


def test_no_nucleus_keeps_the_whole_image_and_says_so():
    img = smear(nucleus=None)
    p = prepare(img, 64, Framing())
    assert p.cell is not None and not p.cell.found
    assert Framing().crop_box(p.cell) == (0.0, 0.0, 1.0, 1.0)
    np.testing.assert_allclose(p.image.astype(int), preprocess(img, 64).astype(int), atol=2)


def test_framing_scales_the_cell_to_the_target_whatever_the_zoom():
    """The same cell at two magnifications comes out the same size."""
    small = smear(size=256, nucleus=(128, 128, 16))
    big = np.asarray(Image.fromarray(small).resize((512, 512), Image.BILINEAR))[128:384, 128:384]
    f = Framing()
    extents = [locate_image(preprocess(prepare(im, 128, f).image, 128)).extent for im in (small, big)]
    assert abs(extents[0] - f.target) < 0.06 and abs(extents[1] - f.target) < 0.06


def test_framing_pads_with_the_background_colour_near_the_edge():
    bg = (240, 230, 200)
    img = smear(size=256, nucleus=(30, 30, 40), background=bg)  # a big cell in the corner
    p = prepare(img, 64, Framing())
    assert p.cell.found
    corner = p.image[:3, :3].reshape(-1, 3).astype(int)
    assert np.abs(corner - np.array(bg)).max() < 25  # not black, not a reflection of the cell


def test_partial_framing_keeps_part_of_the_size_difference():
    """power 0.5: a nucleus twice another's size comes out sqrt(2) times as big, not the
    same (power 1) nor twice (no framing); a nucleus of extent ``ref`` lands at ``target``."""
    full, half = Framing(), Framing(power=0.5, ref=0.32)
    small, large = CellBox(0.5, 0.5, 0.2, True), CellBox(0.5, 0.5, 0.4, True)

    def framed(f, cell):
        x0, _, x1, _ = f.crop_box(cell)
        return cell.extent / (x1 - x0)

    assert framed(full, small) == pytest.approx(framed(full, large))
    assert framed(half, large) / framed(half, small) == pytest.approx(2 ** 0.5)
    assert framed(half, CellBox(0.5, 0.5, 0.32, True)) == pytest.approx(half.target)
    assert Framing.of_config({"power": 0.5}) == half
    assert Framing.of_config(True) == full and Framing.of_config(False) is None


def test_crop_box_is_limited():
    f = Framing(target=0.4, min_side=0.25, max_side=3.0)
    x0, _, x1, _ = f.crop_box(CellBox(0.5, 0.5, 0.01, True))  # a speck: no 40x zoom
    assert x1 - x0 == pytest.approx(0.25)
    x0, _, x1, _ = f.crop_box(CellBox(0.5, 0.5, 2.0, True))
    assert x1 - x0 == pytest.approx(3.0)


def test_framing_round_trips_through_model_metadata():
    f = Framing(target=0.35)
    base = {"architecture": "cnn3", "classes": ["a", "b"], "image_size": 64}
    meta = ModelFile.from_dict({**base, "preprocess": {"framing": f.to_dict()}})
    assert Framing.of_model(ModelFile.from_dict(meta.to_dict())) == f
    assert Framing.of_model(ModelFile.from_dict({**base, "preprocess": {"version": 1}})) is None  # older
    assert Framing.of_model(ModelFile.from_dict(base)) is None


# ----------------------------------------------------------------------------- augmentation

def _batch(n=8):
    return torch.from_numpy(np.stack([smear(128, (64, 64, 14), seed=i) for i in range(n)])) \
        .permute(0, 3, 1, 2).float()


def test_domain_augment_is_identity_in_eval_and_varies_in_train():
    x = _batch()
    aug = DomainAugment().eval()
    assert torch.equal(aug(x), x)
    aug.train()
    torch.manual_seed(0)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 255
    assert (y - x).abs().mean() > 5  # it changed the images
    torch.manual_seed(0)
    np.random.seed(0)
    y1 = aug(x)
    torch.manual_seed(0)
    np.random.seed(0)
    assert torch.allclose(y1, aug(x))  # seeded: reproducible


def test_zoom_out_fills_with_background_not_black():
    x = _batch(4)
    aug = DomainAugment(zoom=1.0, shift=0.0, stain=0.0, color=0.0, p_blur=0, p_lowres=0,
                        p_jpeg=0, noise=0).train()
    torch.manual_seed(3)
    y = aug(x)
    # rotated/zoomed-out corners: every pixel stays as bright as a slide, never black
    assert float(y.amin(dim=(1, 2, 3)).min()) > 40


def test_stain_jitter_keeps_white_white_and_changes_stain():
    aug = DomainAugment(stain=0.3)
    x = torch.full((2, 3, 4, 4), 255.0)
    x[:, :, :2] = torch.tensor([85.0, 50.0, 140.0]).view(1, 3, 1, 1)
    torch.manual_seed(1)
    y = aug.stain_jitter(x)
    assert (y[:, :, 2:] - 255).abs().max() < 40   # background barely moves (OD ~0)
    assert (y[:, :, :2] - x[:, :, :2]).abs().max() > 3  # the stain does


# ----------------------------------------------------------------------------- real masks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.realdata
@pytest.mark.skipif(not (DATA / "wbc_cellavision_masks").is_dir(), reason="needs ../shared/data")
def test_locator_against_hand_drawn_masks():
    """Centre and size of the located nucleus vs the masks of 100 other-lab images
    (benchmarks/locator_eval.py prints the same figures)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from locator_eval import wbc_table
    centre, size = wbc_table(DATA / "wbc_cellavision", DATA / "wbc_cellavision_masks", 128)
    assert len(centre) >= 97                    # a nucleus found in nearly every image
    assert np.median(centre) < 0.02 and np.percentile(centre, 90) < 0.07
    assert 0.9 < np.median(size) < 1.1 and np.percentile(size, 90) < 1.3


def test_domain_augment_p_leaves_the_look_of_the_rest_alone():
    """p = 0: geometry only (a flat slide stays exactly its colour); p = 1: every image recoloured."""
    flat = torch.full((6, 3, 32, 32), 200.0)
    flat[:, 2] = 180.0
    torch.manual_seed(0)
    np.random.seed(0)
    none, every = DomainAugment(p=0.0).train(), DomainAugment(p=1.0).train()
    torch.testing.assert_close(none(flat), flat)
    changed = (every(flat) - flat).abs().amax(dim=(1, 2, 3)) > 1
    assert bool(changed.all())
