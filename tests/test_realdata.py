"""Real-data smoke tests on a small stratified subset of ../shared/data/pbc
(skipped when it is absent). Minutes of training belong in benchmarks, not here."""
import numpy as np
import pytest
import torch

from bloodcell import data as D
from bloodcell.models import create_model
from bloodcell.train import TrainConfig, train

pytestmark = pytest.mark.realdata


def _subset_folder(real_data, tmp_path, per_class, seed=0):
    """tmp folder of symlinks: per_class images of each class (never copies into the repo)."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "subset"
    for cdir in sorted(p for p in real_data.iterdir() if p.is_dir()):
        files = sorted(f for f in cdir.iterdir() if not f.name.startswith("."))
        (root / cdir.name).mkdir(parents=True)
        for f in rng.choice(files, size=per_class, replace=False):
            (root / cdir.name / f.name).symlink_to(f)
    return root


def test_real_folder_scans_and_skips_ds_store(real_data):
    ds = D.scan(real_data)
    assert len(ds.classes) == 8 and len(ds) >= 11965
    assert {"path": "neutrophil/.DS_169665.jpg",
            "reason": "hidden file (e.g. macOS metadata), not an image"} in ds.skipped
    assert all(not s.path.endswith(".DS_169665.jpg") for s in ds.samples)


@pytest.mark.slow
@pytest.mark.parametrize("model,lr,per_class,epochs", [("cnn3", 2e-3, 80, 6),
                                                       ("lite0-finetune", 1e-3, 30, 3)])
def test_training_smoke_beats_chance(real_data, tmp_path, model, lr, per_class, epochs):
    root = _subset_folder(real_data, tmp_path, per_class=per_class)
    s = train(TrainConfig(model=model, data=str(root), out=str(tmp_path / "run"), image_size=64,
                          epochs=epochs, batch_size=16, lr=lr, patience=0, progress=False,
                          fractions=(0.6, 0.2, 0.2)))
    h = s["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    # chance is 0.125: well above chance
    assert s["best"]["val_accuracy"] >= 0.3, h


def test_pretrained_lite0_features_beat_random_init(real_data, tmp_path):
    """The shipped ImageNet weights really are pretrained: linear probe on their
    features beats the same probe on a random-init backbone by a wide margin."""
    from sklearn.linear_model import LogisticRegression
    from bloodcell.transforms import to_tensor
    root = _subset_folder(real_data, tmp_path, per_class=25, seed=1)
    ds = D.scan(root)
    images, _ = D.load_images(ds, 96, progress=False)
    y = ds.labels
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(y), bool)
    for c in range(8):
        test_mask[rng.choice(np.where(y == c)[0], 8, replace=False)] = True

    def probe(pretrained):
        torch.manual_seed(0)
        m = create_model("lite0-frozen", 8, 96, pretrained=pretrained).eval()
        feats_net = torch.nn.Sequential(m.normalize, m.backbone, m.pool, m.flatten)
        with torch.no_grad():
            f = feats_net(to_tensor(np.asarray(images))).numpy()
        clf = LogisticRegression(max_iter=2000).fit(f[~test_mask], y[~test_mask])
        return clf.score(f[test_mask], y[test_mask])

    acc_pre, acc_rand = probe(True), probe(False)
    assert acc_pre >= 0.6 and acc_pre >= acc_rand + 0.15, (acc_pre, acc_rand)
