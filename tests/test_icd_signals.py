"""signals.py: the numbers that say whether the decoder learnt, checked on cases with known answers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stage2_student_distill.method.decoder import DecoderOutput
from stage2_student_distill.method.losses import binary_entropy, prior_entropy
from stage2_student_distill.method.module import DecodedBatch
from stage2_student_distill.method.queries import InstanceQueries
from stage2_student_distill.signals import _attention_stats, _AttentionStats, roc_auc


def test_prior_entropy_is_the_bce_of_the_constant_predictor():
    assert float(binary_entropy(1 / 6)) == pytest.approx(-(math.log(1 / 6) / 6 + 5 / 6 * math.log(5 / 6)))
    assert float(binary_entropy(0.0)) == 0.0 == float(binary_entropy(1.0))
    is_real = torch.tensor([[True, False, False, False], [True, True, False, False]])
    padding = torch.tensor([[False, False, False, True], [False, False, False, False]])
    assert float(prior_entropy(is_real, padding)) == pytest.approx(float(binary_entropy(3 / 7)))
    # the constant predictor logit(p) scores exactly that BCE
    p = torch.full((7,), 3 / 7)
    labels = torch.tensor([1.0, 0, 0, 1, 1, 0, 0])
    assert float(torch.nn.functional.binary_cross_entropy(p, labels)) == pytest.approx(float(binary_entropy(3 / 7)))


def test_roc_auc_is_the_pairwise_ranking_probability_with_ties_half():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    labels = torch.rand(40, generator=g) < 0.3
    pos, neg = scores[labels], scores[~labels]
    naive = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    assert roc_auc(scores, labels) == pytest.approx(naive / (len(pos) * len(neg)))
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([True, True])))


def _decoded(logits: torch.Tensor, boxes: torch.Tensor, num_real: int) -> DecodedBatch:
    n, heads, k, s = logits.shape
    is_real = torch.zeros(n, k, dtype=torch.bool)
    is_real[:, :num_real] = True
    queries = InstanceQueries(
        descriptors=torch.zeros(n, k, 1),
        ref_points=torch.zeros(n, k, 2),
        boxes=boxes,
        labels=torch.zeros(n, k, dtype=torch.long),
        is_real=is_real,
        padding=torch.zeros(n, k, dtype=torch.bool),
    )
    return DecodedBatch(
        queries,
        DecoderOutput(torch.zeros(n, k, 4), logits, torch.zeros(n, heads, s, 2)),
        torch.zeros(n, k, 5),
        torch.zeros(n, s, dtype=torch.bool),
        [(4, 4)],
        [8],
    )


def test_attention_stats_separate_focused_from_shared_maps():
    # one 32 x 32 image, one 4 x 4 level of stride 8: token (r, c) has its centre at (8c + 4, 8r + 4)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])  # normalised xyxy
    focused = torch.full((1, 2, 3, 16), -1e4)
    focused[0, :, 0, 0] = 0.0  # instance 0 on token (0, 0), inside its box
    focused[0, :, 1, 15] = 0.0  # instance 1 on token (3, 3), inside its box
    stats = _AttentionStats()
    _attention_stats(_decoded(focused, boxes, 2), [(32, 32)], 1.0, stats)
    assert stats.cosine_sum / stats.cosine_images == pytest.approx(0.0, abs=1e-6)
    assert stats.inbox_sum / stats.instances == pytest.approx(1.0)
    assert stats.uniform_sum / stats.instances == pytest.approx(4 / 16)  # 2 x 2 of the 4 x 4 tokens

    shared = torch.zeros(1, 2, 3, 16)  # every instance attends uniformly
    stats = _AttentionStats()
    _attention_stats(_decoded(shared, boxes, 2), [(32, 32)], 1.0, stats)
    assert stats.cosine_sum / stats.cosine_images == pytest.approx(1.0)
    assert stats.inbox_sum / stats.instances == pytest.approx(stats.uniform_sum / stats.instances)
