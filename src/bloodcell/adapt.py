"""Adapt a model to another lab's cells from a handful of labelled ones (issue 12).

A model trained on one lab's smears reads that lab's stain, optics and zoom as
part of each class. Given 5-20 labelled cells per class from the new lab (a
class-folder FOLDER, or the reviewed cells of the lab page's database), this:

1. preprocesses them with the base model's own preprocessing (its framing too);
2. optionally re-estimates the BatchNorm statistics on them (AdaBN, Li et al. 2016;
   ``adabn``: the new lab's share, blended with the base model's; off by default:
   on 10 cells per class it lowered accuracy on wbc_cellavision);
3. fine-tunes the network (``mode="full"``): every layer from block ``train_from``,
   on freshly augmented copies of the cells each step (flips, 90-degree turns, stain
   and colour jitter), BatchNorm statistics frozen (5-20 cells per class cannot
   estimate them), an L2 pull towards the base weights (L2-SP, Li et al. 2018), and
   the package's example cells of the classes the lab did not label in every step
   (``anchors``), so the classes it has but did not label are not unlearned, shown in
   the lab's zoom and colours (``anchor_style``, :mod:`bloodcell.restyle`); or
   (``mode="head"``) fits only the top on features cached from several augmented
   views, which costs seconds instead of minutes but measured less accurate;
4. refits the temperature on **cross-fitted** logits: each cell is scored by a
   model adapted without it (``folds``), so the temperature is not fitted on
   cells the model has memorised (that would make it over-confident); these
   out-of-fold models see fewer cells than the final one, which errs on the
   cautious (under-confident) side; and it is never below the base model's (a
   handful of cells all right out of fold would fit a temperature near 0: every
   answer ~1.0 and no review flag);
5. refits the input check's colour statistics on the new lab's cells, with a
   small-sample threshold (``inputcheck.fit_input_check(predictive=True)``), and
   records the lab's image size, so its cells are not all flagged as unusual;
6. keeps the 8-class head, the base model's review threshold and preprocessing,
   and records provenance (base weights' sha1, each cell's sha1, seed, settings).

The result is an ordinary model (same architecture and model.json format), so
``--model RUN`` works in predict, evaluate and serve.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .locate import Framing
from .modelfile import ModelFile, bundled_model_path, resolve_model_path, weights_sha1
from .tensorops import to_tensor
from .transforms import ImageError, SourceInfo, prepare

log = logging.getLogger("bloodcell")

MIN_IMAGES = 12  # the colour check fits 6 means + a 6x6 covariance


@dataclass
class LabelledCells:
    """The new lab's labelled cells, preprocessed for one model."""
    images: np.ndarray                 # uint8 [N, S, S, 3], the model's own preprocessing
    labels: np.ndarray                 # int64 [N], indices into ``classes``
    classes: list[str]                 # the model's classes (all of them)
    names: list[str]                   # where each came from (relative path or cell id)
    sha1s: list[str]                   # content hash of each source image
    source: str                        # the folder or database
    sources: list[SourceInfo]          # each input's size before preprocessing (input checks)
    skipped: list[dict] = field(default_factory=list)   # {path, reason}

    def class_counts(self) -> dict[str, int]:
        n = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, n) if k}

    def subset(self, idx) -> "LabelledCells":
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledCells(self.images[idx], self.labels[idx], self.classes,
                             [self.names[i] for i in idx], [self.sha1s[i] for i in idx], self.source,
                             [self.sources[i] for i in idx])


# Per-mode defaults of the settings left None (measured on ../shared/data/wbc_cellavision,
# docs/other-labs.md section 4).
MODE_DEFAULTS = {
    "head": {"steps": 300, "lr": 1e-2, "l2sp": 0.3, "train_from": 17, "batch_size": 32, "augment": "model",
             "folds": 3, "anchors": False, "anchor_style": False},
    # two folds: each full fit costs a minute or more on a 2-core CPU
    "full": {"steps": 40, "lr": 1e-3, "l2sp": 0.01, "train_from": 0, "batch_size": 0, "augment": "turns",
             "folds": 2, "anchors": True, "anchor_style": True},
}
AUGMENTS = ("model", "domain", "turns", "none")


@dataclass
class AdaptSettings:
    """How the adaptation runs (recorded in model.json). ``mode`` "head": the top of the
    network fitted on cached features of augmented views (seconds); "full": every layer
    from block ``train_from`` fine-tuned on freshly augmented images each step
    (minutes). Settings left None take their mode's :data:`MODE_DEFAULTS`."""
    seed: int = 0
    mode: str = "full"        # measured better than "head" (docs/other-labs.md section 4)
    views: int = 8             # head mode: views of each cell whose features are cached
    steps: int | None = None   # optimiser steps
    batch_size: int | None = None  # cells per step, class-balanced (0: all of them, every step)
    lr: float | None = None    # peak learning rate (warm-up over 10 % of the steps, then cosine)
    l2sp: float | None = None  # pull towards the base weights (sum of squares, times this)
    label_smoothing: float = 0.1
    adabn: float = 0.0         # BatchNorm statistics: share of the new lab's (0 = the base model's)
    train_from: int | None = None  # first trained block of EfficientNet-Lite0 (16 blocks; 17: the head
                                   # only; 0: the stem too)
    augment: str | None = None  # full mode: "model" (its training augmentation), "domain"
                                # (bloodcell.augment.DomainAugment), "turns" (flips, 90-degree turns,
                                # stain and colour jitter), "none"
    folds: int | None = None   # cross-fitting for the temperature (0: keep the base temperature)
    present_only: bool = False  # the loss's softmax over the labelled classes only (measured worse)
    anchors: bool | None = None  # full mode: the package's example cells (PBC, two per class) of the
                               # classes the new lab did not label join every step, so the fine-tune
                               # does not unlearn those classes
    anchor_style: bool | None = None  # anchors restyled to the lab's zoom and colours (bloodcell.restyle;
                                      # wbc_cellavision k=10: 0.819 vs 0.805 in PBC's style)
    soup: int = 1              # fits from the same start with different seeds, weights averaged
    wise: float = 1.0          # share of the fitted weights kept; the rest is the start's (WiSE-FT)

    def __post_init__(self):
        if self.mode not in MODE_DEFAULTS:
            raise ValueError(f"adapt mode {self.mode!r}: use one of {', '.join(MODE_DEFAULTS)}")
        for k, v in MODE_DEFAULTS[self.mode].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.soup < 1 or not 0.0 <= self.wise <= 1.0:
            raise ValueError(f"adapt soup {self.soup} (>= 1) or wise {self.wise} (0..1) out of range")
        if self.augment not in AUGMENTS:
            raise ValueError(f"adapt augment {self.augment!r}: use one of {', '.join(AUGMENTS)}")


@dataclass
class Adapted:
    model: torch.nn.Module
    meta: ModelFile            # the new model.json
    report: dict               # what was done and measured (also in meta.adaptation)


# ----------------------------------------------------------------------------- labelled cells

def match_class_folders(names: list[str], classes: list[str], where: str) -> dict[str, int]:
    """Folder name -> class index, in any letter case; unknown names are an error naming them."""
    lower = {c.lower(): i for i, c in enumerate(classes)}
    unknown = sorted(n for n in names if n.lower() not in lower)
    if unknown:
        raise ValueError(f"{where}: folder(s) {', '.join(repr(n) for n in unknown)} are not classes of "
                         f"the model (use any of: {', '.join(classes)}; letter case does not matter)")
    return {n: lower[n.lower()] for n in names}


def _preprocess_all(items, size: int, framing: Framing | None):
    """[(name, source, label, sha1)] -> kept arrays + skipped [{path, reason}]."""
    images, kept, skipped = [], [], []
    for name, src, label, sha1 in items:
        try:
            prep = prepare(src, size, framing)
            images.append(prep.image)
            kept.append((name, label, sha1, prep.source))
        except ImageError as e:
            skipped.append({"path": name, "reason": e.reason})
    return images, kept, skipped


def _finish(images, kept, skipped, classes, source) -> LabelledCells:
    if skipped:
        log.warning("skipped %d image(s):\n%s", len(skipped),
                    "\n".join(f"  {s['path']}: {s['reason']}" for s in skipped))
    if len(kept) < MIN_IMAGES:
        raise ValueError(f"{source}: {len(kept)} usable labelled image(s); adapt needs at least "
                         f"{MIN_IMAGES} (5-20 per class is typical)")
    return LabelledCells(np.stack(images), np.array([k[1] for k in kept], dtype=np.int64), list(classes),
                         [k[0] for k in kept], [k[2] for k in kept], str(source), [k[3] for k in kept],
                         skipped)


def load_folder(folder, classes: list[str], size: int, framing: Framing | None = None) -> LabelledCells:
    """FOLDER/<class>/<images>, class folders named like the model's classes in any case,
    any subset of them. Bad files are skipped with the reason."""
    from .data import file_digest, iter_image_files
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"adaptation folder not found: {root}" if not root.exists()
                                else f"not a folder: {root}")
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise ValueError(f"{root}: no class sub-folders (expected {root}/<class>/<images>, "
                         f"class one of: {', '.join(classes)})")
    index = match_class_folders(dirs, classes, str(root))
    items, skipped = [], []
    for d in dirs:
        for p, reason in iter_image_files(root / d):
            rel = p.relative_to(root).as_posix()
            if reason:
                skipped.append({"path": rel, "reason": reason})
            else:
                items.append((rel, p, index[d], file_digest(p)))
    images, kept, bad = _preprocess_all(items, size, framing)
    return _finish(images, kept, skipped + bad, classes, root)


def load_reviewed(db, classes: list[str], size: int, framing: Framing | None = None,
                  sample: str | None = None) -> LabelledCells:
    """The lab page's reviewed cells (a reviewer set or corrected their class) as labelled
    cells: every sample's, or only those of the sample named ``sample``."""
    import hashlib

    from .serve.store import Store
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"database not found: {path}")
    store = Store(path, read_only=True)  # read while the lab page may be running on it
    try:
        samples = store.list_samples()
        if sample is not None:
            samples = [s for s in samples if s["name"] == sample]
            if not samples:
                raise ValueError(f"{path}: no sample named {sample!r}")
        lower = {c.lower(): i for i, c in enumerate(classes)}
        items, skipped = [], []
        for s in samples:
            for c in store.cells(s["id"]):
                if not c["corrected"]:
                    continue
                name = f"{s['name']}/{c['file_name']} (cell {c['id']})"
                if c["true_class"].lower() not in lower:
                    skipped.append({"path": name, "reason": f"class {c['true_class']!r} is not the model's"})
                    continue
                data = store.cell_image(c["id"])[0]
                items.append((name, data, lower[c["true_class"].lower()], hashlib.sha1(data).hexdigest()))
    finally:
        store.close()
    if not items and not skipped:
        raise ValueError(f"{path}: no reviewed cells" + (f" in sample {sample!r}" if sample else "")
                         + "; set cells' classes on the lab page first")
    images, kept, bad = _preprocess_all(items, size, framing)
    return _finish(images, kept, skipped + bad, classes, path)


# ----------------------------------------------------------------------------- the network's two parts

class _Upper(torch.nn.Module):
    """The trained top of a models.Classifier: blocks[train_from:] (Lite0) -> head."""

    def __init__(self, model, train_from: int):
        super().__init__()
        bb = model.backbone
        self.lite0 = hasattr(bb, "_blocks") and train_from <= len(bb._blocks)
        self.blocks = torch.nn.ModuleList(bb._blocks[train_from:]) if self.lite0 else torch.nn.ModuleList()
        self.conv_head = bb._conv_head if self.lite0 else None
        self.bn1 = bb._bn1 if self.lite0 else None
        self.pool, self.dropout, self.head = model.pool, model.dropout, model.head

    def forward(self, h):
        if self.lite0:
            for b in self.blocks:
                h = b(h)
            h = self.pool(F.relu6(self.bn1(self.conv_head(h)))).flatten(1)
        return self.head(self.dropout(h))


def _lower(model, x, train_from: int):
    """Input -> what :class:`_Upper` takes (pooled features for non-Lite0 backbones)."""
    bb = model.backbone
    h = model.normalize(x)
    if not hasattr(bb, "_blocks") or train_from > len(bb._blocks):
        return model.flatten(model.pool(bb(h)))
    h = F.relu6(bb._bn0(bb._conv_stem(h)))
    for b in bb._blocks[:train_from]:
        h = b(h)
    return h


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(model, images: np.ndarray, share: float, batch_size: int = 64) -> None:
    """AdaBN: BatchNorm statistics re-estimated on ``images`` (and their 90-degree turns,
    so a handful of cells gives steadier estimates), blended with the model's own."""
    from .train import recalibrate_bn
    if share <= 0:
        return
    bns = _bn_layers(model)
    old = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    turns = np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)])
    recalibrate_bn(model, np.ascontiguousarray(turns), np.arange(len(turns)), batch_size=batch_size)
    for m, (mean, var) in zip(bns, old):
        m.running_mean.mul_(share).add_(mean, alpha=1 - share)
        m.running_var.mul_(share).add_(var, alpha=1 - share)


@torch.no_grad()
def cached_views(model, images: np.ndarray, s: AdaptSettings, batch_size: int = 64) -> torch.Tensor:
    """Lower-network features of ``s.views`` views per image [V, N, ...]: view 0 as is, the
    others through the model's own training augmentation (its stain/zoom jitter)."""
    aug = getattr(model, "augment", None)
    model.eval()
    out = []
    for v in range(s.views):
        feats = []
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i:i + batch_size])
            if v and aug is not None:
                aug.train()
                x = aug(x)
                aug.eval()
            feats.append(_lower(model, x, s.train_from).contiguous())
        out.append(torch.cat(feats))
    return torch.stack(out)


@contextlib.contextmanager
def _one_thread():
    """The fit's tensors are small: one thread. On a busy 2-core CPU a second thread makes
    each small op wait for a core (measured: a 1280x8 head step 0.02 s on one thread, 0.58 s
    on two; the last Lite0 block, batch 32, 1.6 s vs 3.4 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_upper(upper: _Upper, feats: torch.Tensor, labels: np.ndarray, s: AdaptSettings, seed: int) -> None:
    """Train the upper part on cached view features [V, N, ...] (a random view of each cell
    in each batch)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in upper.parameters() if p.requires_grad]

    def logits_of(idx):
        views = torch.randint(0, feats.shape[0], (len(idx),), generator=gen)
        return upper(feats[views, torch.from_numpy(idx)])
    with _one_thread():
        _fit(upper, params, labels, s, seed, logits_of)


def _augmenter(model, name: str):
    from .augment import DomainAugment, TurnAugment
    return {"model": getattr(model, "augment", None), "domain": DomainAugment(), "turns": TurnAugment(),
            "none": None}[name]


def _trainable(model, train_from: int) -> list:
    """Parameters from block ``train_from`` up (Lite0; 0 includes the stem); other backbones:
    all of them. Only these require gradients, so autograd skips the frozen part."""
    bb = model.backbone
    if hasattr(bb, "_blocks"):
        mods = [*bb._blocks[train_from:], bb._conv_head, bb._bn1, model.head]
        mods += [bb._conv_stem, bb._bn0] if train_from <= 0 else []
    else:
        mods = [bb, model.head]
    model.requires_grad_(False)
    for m in mods:
        m.requires_grad_(True)
    return [p for m in mods for p in m.parameters()]


def fit_full(model, images: np.ndarray, labels: np.ndarray, s: AdaptSettings, seed: int) -> None:
    """Fine-tune the network itself on the cells, freshly augmented every step (``s.augment``)."""
    torch.manual_seed(seed)  # the augmentations draw from torch's global generator
    aug, own = _augmenter(model, s.augment), getattr(model, "augment", None)
    params = _trainable(model, s.train_from)
    x_all = to_tensor(images)

    def logits_of(idx):
        x = x_all[torch.from_numpy(idx)]
        if aug is not None:
            aug.train()
            with torch.no_grad():
                x = aug(x)
        if own is not None:
            own.eval()  # augmented above, not twice
        return model(x)
    with _one_thread():
        _fit(model, params, labels, s, seed, logits_of)


def _fit(module, params: list, labels: np.ndarray, s: AdaptSettings, seed: int, logits_of) -> None:
    """The optimiser loop shared by both modes: class-balanced batches (or all the cells),
    BatchNorm statistics frozen, warm-up + cosine learning rate, L2-SP towards the start."""
    from .train import lr_at
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    keep = torch.from_numpy(present)
    # targets as positions among the present classes when the loss sees only those
    target = torch.from_numpy(np.searchsorted(present, labels) if s.present_only else labels)
    per_class = {k: np.flatnonzero(labels == k) for k in present}
    anchor = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.steps, s.lr, "onecycle")
        if s.batch_size:
            idx = np.array([rng.choice(per_class[k]) for k in rng.choice(present, size=s.batch_size)])
        else:
            idx = np.arange(len(labels))
        module.train()
        for m in _bn_layers(module):
            m.eval()  # a handful of cells per batch: keep the (adapted) running statistics
        logits = logits_of(idx)
        if s.present_only:  # absent classes: no gradient from cells that are never theirs
            logits = logits[:, keep]
        loss = F.cross_entropy(logits, target[idx], label_smoothing=s.label_smoothing)
        if s.l2sp:
            loss = loss + s.l2sp * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 9 or step == s.steps - 1:
            log.debug("adapt step %d/%d: loss %.3f", step + 1, s.steps, loss.item())
    module.eval()


@torch.no_grad()
def _upper_logits(upper: _Upper, feats: torch.Tensor) -> np.ndarray:
    upper.eval()
    return upper(feats).float().numpy()


@torch.no_grad()
def _model_logits(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    return np.concatenate([model(to_tensor(images[i:i + batch_size])).float().numpy()
                           for i in range(0, len(images), batch_size)])


def _folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold of each cell, stratified: each class' cells dealt round-robin in random order."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = (np.arange(len(idx)) + start) % k
        start += len(idx)  # small classes do not all land in fold 0
    return fold


def cross_fitted_logits(start, fit, score, labels: np.ndarray, s: AdaptSettings) -> np.ndarray:
    """Out-of-fold logits: each cell scored (``score(part, idx)``, un-augmented) by a copy of
    ``start`` (the un-adapted model or upper part) fitted without it (``fit(part, idx, seed)``)."""
    fold = _folds(labels, s.folds, s.seed)
    out = None
    for f in range(s.folds):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if not len(te) or not len(tr):
            continue
        part = copy.deepcopy(start)
        fit(part, tr, s.seed + 1 + f)
        logits = score(part, te)
        out = np.zeros((len(labels), logits.shape[1]), np.float32) if out is None else out
        out[te] = logits
    return out


# ----------------------------------------------------------------------------- adapt

def _anchor_cells(cells: LabelledCells, size: int, framing: Framing | None, style: bool):
    """The package's example cells (PBC) of the classes ``cells`` lacks; with ``style``,
    in the lab's zoom and colours."""
    from .predict import example_files
    missing = set(cells.classes) - set(cells.class_counts())
    files = [f for f in example_files() if f.parent.name in missing]
    images = np.stack([prepare(f, size, framing).image for f in files]) if files else cells.images[:0]
    if style and len(images):
        from .restyle import restyle
        images, how = restyle(images, cells.images)
        log.info("adapt: anchors restyled to the lab's look: %s", how)
    return images, np.array([cells.classes.index(f.parent.name) for f in files], dtype=np.int64)


def _averaged(fit, s: AdaptSettings):
    """``fit`` run ``s.soup`` times from the same start (seeds seed, seed + 1000, ...) with
    the weights averaged (a "model soup", Wortsman et al. 2022), then blended back towards
    the start: ``wise`` of the fitted weights (WiSE-FT, Wortsman et al. 2022)."""
    if s.soup == 1 and s.wise == 1.0:
        return fit

    def fit_averaged(part, idx, seed):
        start = {k: v.detach().clone() for k, v in part.state_dict().items()}
        total = None
        for j in range(s.soup):
            part.load_state_dict(start)
            fit(part, idx, seed + 1000 * j)
            got = part.state_dict()
            total = {k: v.detach().clone() for k, v in got.items()} if total is None else \
                {k: total[k] + got[k] if got[k].is_floating_point() else got[k] for k in got}
        mean = {k: (v / s.soup if v.is_floating_point() else v) for k, v in total.items()}
        part.load_state_dict({k: (s.wise * mean[k] + (1 - s.wise) * start[k]) if v.is_floating_point() else v
                              for k, v in mean.items()})
    return fit_averaged


def _fitting(model, cells: LabelledCells, s: AdaptSettings, size: int, framing: Framing | None):
    """(what is fitted, fit(part, idx, seed), score(part, idx) -> logits) for the mode: the
    upper part on cached features (head), or the model itself on the images (full);
    ``fit`` averages ``s.soup`` fits and blends them with the start (``s.wise``)."""
    start, fit, score = _fitting_once(model, cells, s, size, framing)
    return start, _averaged(fit, s), score


def _fitting_once(model, cells: LabelledCells, s: AdaptSettings, size: int, framing: Framing | None):
    if s.mode == "full":
        ax, ay = (_anchor_cells(cells, size, framing, s.anchor_style) if s.anchors
                  else (cells.images[:0], cells.labels[:0]))

        def fit(part, idx, seed):
            fit_full(part, np.concatenate([cells.images[idx], ax]), np.concatenate([cells.labels[idx], ay]),
                     s, seed)
        return model, fit, lambda part, idx: _model_logits(part, cells.images[idx])
    t1 = time.perf_counter()
    feats = cached_views(model, cells.images, s)
    log.info("adapt: %d views' features %.1f s", s.views, time.perf_counter() - t1)

    def fit(part, idx, seed):
        fit_upper(part, feats[:, torch.from_numpy(idx)], cells.labels[idx], s, seed)
    return _Upper(model, s.train_from), fit, lambda part, idx: _upper_logits(part, feats[0, torch.from_numpy(idx)])


def adapt(base_path, cells: LabelledCells, settings: AdaptSettings | None = None) -> Adapted:
    """Adapt the model at ``base_path`` (None: the bundled one) to ``cells``."""
    from .calibrate import fit_temperature, nll
    from .inputcheck import fit_input_check
    from .models import load_model
    s = settings or AdaptSettings()
    t0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(s.seed)
    base_path = Path(base_path) if base_path is not None else bundled_model_path()
    weights, _ = resolve_model_path(base_path)
    model, meta = load_model(base_path)
    if list(meta.classes) != list(cells.classes):
        raise ValueError(f"{cells.source}: cells were labelled for classes {cells.classes}, "
                         f"the model has {meta.classes}")
    adapt_batchnorm(model, cells.images, s.adabn)
    start, fit, score = _fitting(model, cells, s, meta.image_size, Framing.of_model(meta))
    report = {"n_images": len(cells.labels), "class_counts": cells.class_counts()}
    temperature = float(meta.temperature)
    if s.folds >= 2:
        oof = cross_fitted_logits(start, fit, score, cells.labels, s)
        fitted = fit_temperature(oof, cells.labels)
        # a few cells all scored right out of fold drive the NLL's temperature towards 0 (every
        # answer ~1.0, no review flag ever): never more confident than the base model's
        temperature = max(fitted, temperature)
        report["cross_fitted"] = {"folds": s.folds, "accuracy": float((oof.argmax(1) == cells.labels).mean()),
                                  "fitted_temperature": fitted, "nll": nll(oof, cells.labels, temperature)}
        if fitted < temperature:
            log.info("adapt: the cross-fitted temperature %.3f is below the base model's; kept %.3f",
                     fitted, temperature)
    fit(start, np.arange(len(cells.labels)), s.seed)
    log.info("adapt: fitted in %.1f s", time.perf_counter() - t0)
    model.eval()
    check = fit_input_check(cells.images, predictive=True)
    check["min_side"] = int(min(min(src[0], src[1]) for src in cells.sources))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # what it costs on a machine to itself
    adaptation = {
        "base_model": str(base_path), "base_weights_sha1": weights_sha1(weights),
        "base_temperature": meta.temperature, "data": cells.source,
        "settings": asdict(s), **report,
        "temperature_fit": "cross-fitted out-of-fold logits, at least the base model's" if s.folds >= 2
        else "kept the base model's",
        "images": [{"name": n, "class": cells.classes[y], "sha1": h}
                   for n, y, h in zip(cells.names, cells.labels, cells.sha1s)],
        "skipped": cells.skipped}
    # the base model's calibration, test metrics and training history describe another model
    new = replace(meta, calibration=None, metrics=None, history=None, best=None,
                  temperature=temperature, input_check=check, adaptation=adaptation)
    return Adapted(model, new, report)


def save_adapted(adapted: Adapted, out) -> Path:
    """A run folder (model.safetensors + model.json) that ``--model`` accepts."""
    from .models import library_versions, save_model
    out = Path(out)
    save_model(adapted.model, replace(adapted.meta, library_versions=library_versions()), out)
    return out
