"""Does the ICD decoder learn? The measurements that answer it, on cached teacher samples.

A decoder that has not learnt still produces a distillation mask, so the losses alone cannot tell a
working ICD from a generic feature mimic. Four numbers can:

- identification loss vs the prior's entropy: the BCE of always predicting the batch's real/fake ratio
  p is exactly H(p) = -(p ln p + (1 - p) ln(1 - p)) (0.4506 for 1 real in 6); a decoder that tells real
  from fake instances ends clearly below it;
- real-vs-fake AUC of the identification logit (0.5 = chance);
- how different the attention maps of different real instances of one image are: the mean pairwise
  cosine similarity of their softmax maps over all tokens (1 = every instance attends to the same
  places), averaged over heads, pairs and images;
- how much attention mass falls inside the instance's own box, against the uniform map's mass (the
  fraction of the image's tokens whose centre is inside the box).

Computed with the decoder in eval mode, without gradients, and with a fixed query generator so the
numbers are reproducible.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cache_format import CacheReader
from detection.errors import UserError
from stage2_student_distill.method.losses import binary_entropy
from stage2_student_distill.method.module import DecodedBatch, ICDModule
from stage2_student_distill.method.tokens import token_centres
from stage2_student_distill.teacher_samples import TeacherBatch, iter_batches, sample_images


@dataclass
class DecoderSignals:
    """What the decoder learnt, measured on a set of samples (see the module docstring)."""

    loss_ident: float  # mean BCE of the identification logit over all (non-padded) queries
    prior_entropy: float  # BCE of the constant predictor of the set's real/fake ratio
    auc: float  # real-vs-fake ROC AUC of the identification logit; nan without both kinds
    map_cosine: float  # mean pairwise cosine of real instances' attention maps in one image; nan if < 2
    inbox_mass: float  # mean attention mass inside the instance's own box
    inbox_uniform: float  # the same for a uniform map over the image's tokens
    num_images: int
    num_real: int
    num_fake: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of `scores` for binary `labels`: the Mann-Whitney rank statistic, ties counted half.

    Written here rather than taken from scikit-learn: it is a few lines, and this is the only use.
    """
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = scores.sort()
    # tied scores share the mean of the 1-based ranks they occupy
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class _AttentionStats:
    cosine_sum: float = 0.0
    cosine_images: int = 0
    inbox_sum: float = 0.0
    uniform_sum: float = 0.0
    instances: int = 0


def _attention_stats(
    batch: DecodedBatch, image_sizes: Sequence[Sequence[int]], temperature: float, stats: _AttentionStats
) -> None:
    weights = (batch.decoded.logits.float() / temperature).softmax(-1)  # [N, heads, K, S], 0 at padding
    centres = token_centres(batch.shapes, batch.strides, weights.device)  # [S, 2]
    valid = ~batch.key_padding  # [N, S]
    for i, (n_real, (h, w)) in enumerate(zip(batch.queries.num_real, image_sizes)):
        if n_real == 0:
            continue
        maps = weights[i, :, :n_real]  # [heads, n, S]
        boxes = batch.queries.boxes[i, :n_real] * torch.tensor([w, h, w, h], device=weights.device)  # [n, 4] px
        inside = (
            (centres[None, :, 0] >= boxes[:, None, 0])
            & (centres[None, :, 0] <= boxes[:, None, 2])
            & (centres[None, :, 1] >= boxes[:, None, 1])
            & (centres[None, :, 1] <= boxes[:, None, 3])
            & valid[i][None]
        )  # [n, S]
        stats.inbox_sum += float((maps * inside[None]).sum(-1).mean(0).sum())
        stats.uniform_sum += float((inside.sum(-1).double() / valid[i].sum()).sum())
        stats.instances += n_real
        if n_real >= 2:
            unit = torch.nn.functional.normalize(maps, dim=-1)
            gram = unit @ unit.transpose(1, 2)  # [heads, n, n]
            off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
            stats.cosine_sum += float((off_diagonal / (n_real * (n_real - 1))).mean())
            stats.cosine_images += 1


@torch.no_grad()
def measure(icd: ICDModule, batches: Iterable[TeacherBatch], seed: int = 0) -> DecoderSignals:
    """The decoder's signals over `batches` of the module's levels (restores its train/eval mode afterwards)."""
    was_training = icd.training
    icd.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(icd.parameters()).device
    scores, labels, bce = [], [], []
    stats, images = _AttentionStats(), 0
    try:
        for batch in batches:
            batch = batch.to(device)
            decoded = icd.decode(batch.features, batch.image_sizes, batch.targets, generator)
            valid = ~decoded.queries.padding
            logit = decoded.aux[..., 0].float()
            real = decoded.queries.is_real
            scores.append(logit[valid].cpu())
            labels.append(real[valid].cpu())
            bce.append(
                torch.nn.functional.binary_cross_entropy_with_logits(
                    logit[valid], real[valid].float(), reduction="none"
                ).cpu()
            )
            _attention_stats(decoded, batch.image_sizes, icd.temperature, stats)
            images += len(batch.image_sizes)
    finally:
        icd.train(was_training)
    if not scores:
        raise ValueError("no samples to measure the decoder on")
    all_scores, all_labels = torch.cat(scores), torch.cat(labels)
    nan = float("nan")
    return DecoderSignals(
        loss_ident=float(torch.cat(bce).double().mean()),
        prior_entropy=float(binary_entropy(all_labels.double().mean())),
        auc=roc_auc(all_scores, all_labels),
        map_cosine=stats.cosine_sum / stats.cosine_images if stats.cosine_images else nan,
        inbox_mass=stats.inbox_sum / stats.instances if stats.instances else nan,
        inbox_uniform=stats.uniform_sum / stats.instances if stats.instances else nan,
        num_images=images,
        num_real=int(all_labels.sum()),
        num_fake=int((~all_labels).sum()),
    )


def format_signals(signals: DecoderSignals, title: str) -> str:
    """A few lines a person can read: each learnt signal next to what chance gives."""
    return "\n".join(
        [
            title,
            f"  loss_ident {signals.loss_ident:.4f}  (constant prior predictor: {signals.prior_entropy:.4f})",
            f"  real-vs-fake AUC {signals.auc:.3f}  (chance: 0.5)",
            f"  attention maps of different instances: mean pairwise cosine {signals.map_cosine:.3f}  (identical: 1)",
            f"  attention mass inside the own box {signals.inbox_mass:.3f}  (uniform map: {signals.inbox_uniform:.3f})",
        ]
    )


# -- recording ------------------------------------------------------------------------------------------
SIGNALS_FILE = "decoder_signals.json"


def write_signals(path: str | Path, signals: DecoderSignals, context: Mapping[str, Any]) -> Path:
    """The signals and where they were measured as JSON (NaN as null), written atomically."""
    path = Path(path)
    payload = {
        **context,
        **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in signals.as_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_signals(path: str | Path) -> dict[str, Any]:
    """A decoder_signals.json written by `icd distill` or `icd fit-decoder`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"no decoder signals at {path}",
            "run `icd distill` from a cache (or `icd fit-decoder`) with this OUTPUT_DIR first",
        )
    return json.loads(path.read_text())


def record_signals(output_dir: str | Path, iteration: int, signals: DecoderSignals, context: Mapping[str, Any]) -> Path:
    """OUTPUT_DIR/decoder_signals.json, plus `decoder/<name>` records in metrics.json and TensorBoard."""
    from detection.engine.trainer import MetricsLog  # the run's own log (lazy: TensorBoard is slow to import)

    log = MetricsLog(Path(output_dir), enabled=True)
    try:
        log.write_eval(iteration, {"decoder": {k: v for k, v in signals.as_dict().items() if isinstance(v, float)}})
    finally:
        log.close()
    return write_signals(Path(output_dir) / SIGNALS_FILE, signals, {"iteration": iteration, **context})


def evaluation_samples(reader: CacheReader, count: int, seed: int, samples: np.ndarray | None = None) -> np.ndarray:
    """A seeded choice of up to `count` of `samples` (default: all committed ones), in index order."""
    samples = sample_images(reader)[0] if samples is None else np.asarray(samples)
    chosen = np.random.default_rng(seed).choice(len(samples), size=min(count, len(samples)), replace=False)
    return samples[np.sort(chosen)]


def report_distill_signals(
    icd: ICDModule, cache: str, output_dir: str | Path, iteration: int, seed: int, count: int = 64, batch_size: int = 8
) -> DecoderSignals:
    """At the end of `icd distill`: the decoder's signals on cached samples, recorded and printed.

    The student's training images are the cache's, so these are images the decoder trained on, with
    fake queries it never saw (a query seed of its own); `icd fit-decoder` measures on held-out images.
    """
    reader = CacheReader(cache)
    samples = evaluation_samples(reader, count, seed)
    signals = measure(icd, iter_batches(reader, samples, batch_size, icd.levels), seed=seed + 1_000_003)
    path = record_signals(
        output_dir,
        iteration,
        signals,
        {"split": "training images of the cache, fresh fake queries", "cache": reader.url},
    )
    print(format_signals(signals, f"decoder signals ({path})"), flush=True)
    return signals
