"""CutMix / MixUp within a batch (bloodcell train --mix)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bloodcell.mixing import mix_batch, mixed_loss


def _batch(n=6, side=16):
    # image i is filled with the value i: where each pixel came from stays readable
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, side, side).clone()


def test_cutmix_pastes_a_partners_box_and_weighs_labels_by_area():
    x = _batch()
    for seed in range(20):
        out, m = mix_batch(x, "cutmix", 1.0, 1.0, torch.Generator().manual_seed(seed))
        assert m is not None and out.shape == x.shape and torch.equal(x, _batch())  # input untouched
        for i in range(len(x)):
            own = (out[i] == i).float().mean().item()
            partner = int(m.perm[i])
            if partner != i:  # lam is exactly the share of the image's own pixels
                assert own == pytest.approx(m.lam)
                assert set(out[i].unique().tolist()) <= {float(i), float(partner)}


def test_mixup_blends_and_the_loss_follows_the_weight():
    x = _batch()
    out, m = mix_batch(x, "mixup", 0.4, 1.0, torch.Generator().manual_seed(3))
    assert torch.allclose(out, m.lam * x + (1 - m.lam) * x[m.perm])
    logits, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    expect = m.lam * F.cross_entropy(logits, y) + (1 - m.lam) * F.cross_entropy(logits, y[m.perm])
    assert mixed_loss(logits, y, m, 0.0) == pytest.approx(expect.item())
    assert mixed_loss(logits, y, None, 0.1) == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item())


def test_no_mixing_when_off_or_not_drawn_and_draws_repeat_with_the_seed():
    x = _batch()
    assert mix_batch(x, "none", 1.0, 1.0, torch.Generator())[1] is None
    assert mix_batch(x, "cutmix", 1.0, 0.0, torch.Generator())[1] is None  # prob 0
    drawn = [mix_batch(x, "cutmix", 1.0, 0.5, torch.Generator().manual_seed(s))[1] is not None for s in range(40)]
    assert 8 < sum(drawn) < 32  # about half of the batches
    a, ma = mix_batch(x, "cutmix", 1.0, 1.0, torch.Generator().manual_seed(5))
    b, mb = mix_batch(x, "cutmix", 1.0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and ma.lam == mb.lam
    with pytest.raises(ValueError, match="mix 'cutout'"):
        mix_batch(x, "cutout", 1.0, 1.0, torch.Generator())
