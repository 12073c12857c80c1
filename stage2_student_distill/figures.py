"""Figures a person would rather look at than read: loss curves, what the decoder learnt, attention maps.

The loss curves draw loss_ident against the entropy of the batch's real/fake prior (dashed): the
level a decoder that learnt nothing sits at. The decoder-signal panels compare runs on the numbers of
signals.py (identification loss vs prior, real-vs-fake AUC, how alike different instances' attention
maps are, attention mass inside the own box vs a uniform map). The attention maps come from the trained
ICD decoder applied to CACHED teacher features of training samples (the teacher itself never runs): for
each real instance, softmax over positions of its query's attention logits, averaged over heads, on the
finest distilled level, overlaid on the replayed image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cache_contract.identity import recorded_plan  # noqa: E402
from cache_format import CacheReader  # noqa: E402
from detection.data.augment import apply_image  # noqa: E402
from detection.data.datasets import class_statistics, read_image, train_index  # noqa: E402
from detection.engine.checkpoint import load_checkpoint  # noqa: E402
from detection.errors import UserError  # noqa: E402
from stage2_student_distill.method.module import ICDModule  # noqa: E402
from stage2_student_distill.signals import read_signals  # noqa: E402

# Training-record keys that are bookkeeping, not losses (torchvision's loss names vary by architecture:
# classification / bbox_regression / bbox_ctrness / loss_objectness ..., so losses are "everything else").
NOT_LOSSES = {"iteration", "time", "data_time", "lr", "eta_seconds", "ident_prior_entropy"}
# Drawn dashed into the panel of the loss it is the reference level of.
REFERENCE_LINES = {"loss_ident": "ident_prior_entropy"}


def _loss_keys(record: Mapping[str, Any]) -> list[str]:
    return [k for k in record if k not in NOT_LOSSES and "/" not in k]  # "/" marks evaluation metrics


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The training records (one JSON object per line) of an OUTPUT_DIR/metrics.json."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no training log at {path}", "pass the OUTPUT_DIR of a finished `icd train`/`icd distill` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(runs: Mapping[str, str | Path], out: str | Path) -> Path:
    """One panel per loss name found in any run's metrics.json, one line per run."""
    records = {label: [r for r in read_metrics(Path(p)) if _loss_keys(r)] for label, p in runs.items()}
    names = sorted({k for recs in records.values() for r in recs for k in _loss_keys(r)})
    if not names:
        raise UserError(f"no loss values in {list(runs.values())}", "train for at least SOLVER.LOG_PERIOD iterations")
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    colours = {label: f"C{i}" for i, label in enumerate(records)}  # one colour per run in every panel
    for ax, name in zip(axes.flat, names):
        for label, recs in records.items():
            points = [(r["iteration"], r[name]) for r in recs if r.get(name) is not None]
            if points:
                ax.plot(*zip(*points), label=label, color=colours[label], marker="." if len(points) < 20 else None)
            reference = [
                (r["iteration"], r[REFERENCE_LINES[name]])
                for r in recs
                if name in REFERENCE_LINES and r.get(REFERENCE_LINES[name]) is not None
            ]
            if reference:
                ax.plot(*zip(*reference), color=colours[label], linestyle="--", linewidth=1)
        ax.set_title(name + (" (dashed: prior's entropy)" if name in REFERENCE_LINES else ""), fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.legend(
        handles=[plt.Line2D([], [], color=c, label=label) for label, c in colours.items()],
        loc="lower right",
        fontsize=8,
    )
    return _save_figure(fig, out)


def plot_decoder_signals(runs: Mapping[str, str | Path], out: str | Path) -> Path:
    """Four panels, one bar per run (its decoder_signals.json), each against what a decoder that learnt
    nothing gives: loss_ident vs the prior's entropy, AUC vs 0.5, pairwise map cosine vs 1, in-box mass
    vs a uniform map's."""
    signals = {label: read_signals(path) for label, path in runs.items()}
    if not signals:
        raise UserError("no runs to plot decoder signals of", "pass at least one decoder_signals.json")
    panels = [
        ("loss_ident", "prior_entropy", "identification loss\n(tick: prior's entropy)"),
        ("auc", None, "real-vs-fake AUC\n(line: chance)"),
        ("map_cosine", None, "pairwise cosine of instances' maps\n(line: identical)"),
        ("inbox_mass", "inbox_uniform", "attention mass in own box\n(tick: uniform map)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    labels = list(signals)
    x = np.arange(len(labels))
    for ax, (key, reference, title) in zip(axes[0], panels):
        values = [np.nan if signals[lb].get(key) is None else signals[lb][key] for lb in labels]
        ax.bar(x, values, color=[f"C{i}" for i in range(len(labels))])
        if reference is not None:
            refs = [np.nan if signals[lb].get(reference) is None else signals[lb][reference] for lb in labels]
            ax.scatter(x, refs, marker="_", s=600, color="black", zorder=3)
        else:
            ax.axhline(0.5 if key == "auc" else 1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return _save_figure(fig, out)


def load_icd_module(
    cfg: Any, checkpoint: str | Path, channels: int, levels: Sequence[str], strides: Mapping[str, int]
) -> ICDModule:
    """The ICD module of a finished `icd distill` run (its checkpoint's extra state) on `levels`, in eval mode."""
    index = train_index(cfg)
    prior, size_mean, size_std = class_statistics(index)
    icd = ICDModule.from_config(
        cfg,
        index.num_classes,
        channels,
        levels=levels,
        strides=strides,
        class_prior=prior,
        size_prior_mean=size_mean,
        size_prior_std=size_std,
    )
    state = load_checkpoint(checkpoint).get("extra", {}) or {}
    if "icd" not in state:
        raise UserError(f"{checkpoint} holds no ICD module", "pass a checkpoint written by `icd distill`")
    icd.load_state_dict(state["icd"])
    return icd.eval()


@torch.no_grad()
def plot_attention_maps(
    cfg: Any, cache: str, checkpoint: str | Path, out: str | Path, num_samples: int = 4, max_instances: int = 3
) -> Path:
    """Per sample: the replayed image with its boxes, then each instance's attention map overlaid."""
    reader = CacheReader(cache)
    index = train_index(cfg)
    plan = recorded_plan(reader.attributes, reader.url)
    levels = reader.level_names
    strides = {lv.name: lv.stride for lv in reader.levels}
    icd = load_icd_module(cfg, checkpoint, reader.levels[0].channels, levels, strides)
    finest = levels[0]
    committed = np.flatnonzero(reader.committed())
    chosen = []
    for i in committed:
        sample = reader.read_sample(int(i))
        if len(sample.classes):
            chosen.append(sample)
        if len(chosen) == num_samples:
            break
    if not chosen:
        raise UserError(f"the cache {cache} has no committed sample with instances", "dump a cache first")
    cols = 1 + max_instances
    fig, axes = plt.subplots(len(chosen), cols, figsize=(2.6 * cols, 2.6 * len(chosen)), squeeze=False)
    for row, sample in zip(axes, chosen):
        meta = sample.meta
        image = index.image(meta.image_id)
        params = plan.params(meta.image_id, meta.variant, image.height, image.width)
        pixels = apply_image(read_image(image), params).permute(1, 2, 0).numpy().astype(np.uint8)
        features = {name: torch.from_numpy(sample.features[name])[None] for name in levels}
        targets = [{"boxes": torch.from_numpy(sample.boxes), "labels": torch.from_numpy(sample.classes) + 1}]
        size = (meta.resized_h, meta.resized_w)
        maps = icd.attention_masks(features, [size], targets)[0][finest]  # [n, heads, h, w]
        row[0].imshow(pixels)
        row[0].set_title(f"image {meta.image_id} v{meta.variant}", fontsize=8)
        for box in sample.boxes:
            _draw_box(row[0], box, "yellow")
        for k, ax in enumerate(row[1:]):
            ax.axis("off")
            if k >= maps.shape[0]:
                continue
            heat = maps[k].mean(0)[None, None]
            heat = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
            ax.imshow(pixels)
            ax.imshow(heat / max(float(heat.max()), 1e-12), cmap="inferno", alpha=0.6)
            _draw_box(ax, sample.boxes[k], "cyan")
            name = index.class_names[int(sample.classes[k])]
            ax.set_title(f"instance {k}: {name}", fontsize=8)
        row[0].axis("off")
    fig.suptitle(f"instance-conditional attention ({finest}, mean over heads)", fontsize=10)
    return _save_figure(fig, out)


def _save_figure(fig: Any, out: str | Path) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _draw_box(ax: Any, box: np.ndarray, colour: str) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1))
