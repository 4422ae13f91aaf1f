"""The model runtime: one input contract for PyTorch and ONNX Runtime, and the one
batched loop that predict, evaluate, calibrate, the study and training's validation use."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import synthetic_cell
from test_predict import make_model

from bloodcell import predict as P
from bloodcell.models import load_model
from bloodcell.runtime import OnnxRunner, TorchRunner, batched_logits, check_batch, softmax


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    d = make_model(tmp_path_factory.mktemp("m") / "model")
    return {b: P.Classifier.load(d, backend=b, screen=None).runner for b in ("torch", "onnx")}


def test_each_backend_has_its_runner(runners):
    assert isinstance(runners["torch"], TorchRunner) and isinstance(runners["onnx"], OnnxRunner)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_float_images_are_refused_not_cast(runners, backend):
    x = np.stack([synthetic_cell(k) for k in range(2)]).astype(np.float32) / 255.0  # 0..1
    with pytest.raises(ValueError, match=r"uint8 images \[N, 64, 64, 3\].*got dtype float32"):
        runners[backend].logits(x)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (64, 64, 3), (2, 64, 64, 4), (2, 3, 64, 64)])
def test_wrong_shapes_are_refused(runners, backend, shape):
    with pytest.raises(ValueError, match=rf"uint8 images \[N, 64, 64, 3\].*got shape "
                                         rf"\[{', '.join(map(str, shape))}\]"):
        runners[backend].logits(np.zeros(shape, np.uint8))


def test_check_batch_passes_a_good_batch_through():
    x = np.arange(3 * 8 * 8 * 3, dtype=np.uint8).reshape(3, 8, 8, 3)[:, ::-1]  # a non-contiguous view
    out = check_batch(x, 8)
    assert out.flags["C_CONTIGUOUS"] and out.dtype == np.uint8
    np.testing.assert_array_equal(out, x)


def test_both_runners_agree_through_the_one_loop(runners):
    images = np.stack([synthetic_cell(k % 8, seed=k) for k in range(10)])
    idx = np.array([7, 1, 3, 9, 0])
    a = batched_logits(runners["torch"], images, idx, batch_size=2)
    b = batched_logits(runners["onnx"], images, idx, batch_size=3)
    assert a.shape == (5, 8)
    np.testing.assert_allclose(a, b, atol=1e-3)
    # the loop changes nothing: the same as one call on the selected images, in idx order
    np.testing.assert_allclose(a, runners["torch"].logits(images[idx]), atol=1e-5)
    np.testing.assert_allclose(batched_logits(runners["torch"], images, batch_size=4)[idx], a, atol=1e-5)
    assert batched_logits(runners["torch"], images, np.array([], int)).shape == (0, 0)


def test_torch_runner_matches_the_plain_model_and_sets_eval_mode(tmp_path):
    model, meta = load_model(make_model(tmp_path / "m", seed=3))
    x = np.stack([synthetic_cell(k) for k in range(4)])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2).float()).numpy()
    model.train()  # as training's validation hands it over
    got = TorchRunner(model, meta.image_size).logits(x)
    assert not model.training
    np.testing.assert_allclose(got, ref, atol=1e-4)
    p = softmax(got)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    assert (p.argmax(1) == ref.argmax(1)).all()
