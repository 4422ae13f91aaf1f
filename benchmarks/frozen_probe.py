"""How far can a head on a frozen ImageNet backbone go? (the study's generation 5)

Generation 5 trains a softmax head on a frozen backbone. This measures the ceiling of
such a linear head for each offline backbone: pooled features (eval mode, no
augmentation) of every image of the study's split, then a multinomial logistic
regression fitted to convergence on the train split, its strength C chosen on val;
test scored once. If the ceiling sits below the study's 93 % (frozen ResNet-50), no
training schedule of the same head closes the gap: the features are the cause.

    PYTHONPATH=src python benchmarks/frozen_probe.py --split runs/study224/split.csv \
        [--backbones lite0,lite1,lite2] [--size 224] [--features-dir runs/frozen_probe]

Features are cached per backbone in --features-dir (re-runs only fit).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bloodcell import data as D
from bloodcell.models import _lite
from bloodcell.tensorops import to_tensor

C_GRID = (0.01, 0.1, 1.0, 10.0)


@torch.inference_mode()
def pooled_features(variant: str, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """[N, 1280] global-average-pooled features of the ImageNet backbone (its own normalisation)."""
    net = _lite(8, True, frozen=True, variant=variant).eval()
    trunk = torch.nn.Sequential(net.normalize, net.backbone, net.pool, net.flatten)
    out = []
    for i in range(0, len(images), batch):
        out.append(trunk(to_tensor(images[i:i + batch])).float().numpy())
    return np.concatenate(out)


def probe(feats: np.ndarray, y: np.ndarray, split: np.ndarray) -> dict:
    """Logistic regression on standardised features; C picked by val accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    tr, va, te = (split == s for s in D.SPLITS)
    sc = StandardScaler().fit(feats[tr])
    x = sc.transform(feats)
    by_c = {}
    for c in C_GRID:
        m = LogisticRegression(C=c, max_iter=3000).fit(x[tr], y[tr])
        by_c[c] = (float(m.score(x[va], y[va])), m)
    best = max(by_c, key=lambda c: by_c[c][0])
    m = by_c[best][1]
    return {"C": best, "val_by_C": {str(c): round(v[0], 4) for c, v in by_c.items()},
            **{s: round(float(m.score(x[mask], y[mask])), 4) for s, mask in zip(D.SPLITS, (tr, va, te))}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/pbc")
    ap.add_argument("--split", required=True, help="the study's split.csv")
    ap.add_argument("--backbones", default="lite0,lite2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--features-dir", default="runs/frozen_probe")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    ds = D.scan(a.data)
    split = np.array(D.apply_manifest(ds, D.read_manifest(Path(a.split))))
    images, _ = D.load_images(ds, a.size, progress=False)
    print(f"{len(ds.labels)} images, split {dict(zip(*np.unique(split, return_counts=True)))}, {a.size} px, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for v in a.backbones.split(","):
        f = Path(a.features_dir) / f"{v}-{a.size}.npy"
        t0 = time.perf_counter()
        if f.exists():
            feats = np.load(f)
        else:
            feats = pooled_features(v, images)
            f.parent.mkdir(parents=True, exist_ok=True)
            np.save(f, feats)
        t1 = time.perf_counter()
        results[v] = {**probe(feats, ds.labels, split), "feature_s": round(t1 - t0, 1),
                      "fit_s": round(time.perf_counter() - t1, 1)}
        r = results[v]
        print(f"{v}: frozen features + logistic regression (C {r['C']}): train {r['train']:.4f} "
              f"val {r['val']:.4f} test {r['test']:.4f}  (val by C {r['val_by_C']}; "
              f"features {r['feature_s']} s, fits {r['fit_s']} s)")
    if a.json:
        D.atomic_write_json(Path(a.json), {"split": a.split, "size": a.size, "results": results})
        print(json.dumps(results)[:0] + f"wrote {a.json}")


if __name__ == "__main__":
    main()
