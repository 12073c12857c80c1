"""ICD losses against naive loop computations of docs/METHOD.md, sections 3 and 4."""

from __future__ import annotations

import math

import pytest
import torch

from stage2_student_distill.method.losses import (
    distillation_loss,
    distillation_mask,
    identification_loss,
    localisation_loss,
)

torch.set_num_threads(1)


def naive_layer_norm(vec):
    mean = sum(vec) / len(vec)
    var = sum((x - mean) ** 2 for x in vec) / len(vec)
    return [(x - mean) / math.sqrt(var + 1e-5) for x in vec]


def naive_distill(v_s, v_t, logits, is_real, temperature, weight):
    n_img, heads, num_k, seq = logits.shape
    d = v_s.shape[-1]
    terms = []
    for n in range(n_img):
        for h in range(heads):
            mask = [0.0] * seq
            for k in range(num_k):
                if not is_real[n, k]:
                    continue
                exps = [
                    math.exp(logits[n, h, k, s].item() / temperature) if logits[n, h, k, s] != float("-inf") else 0.0
                    for s in range(seq)
                ]
                total = sum(exps)
                for s in range(seq):
                    mask[s] += exps[s] / total
            mask_sum = sum(mask)
            ls = [naive_layer_norm(v_s[n, h, s].tolist()) for s in range(seq)]
            lt = [naive_layer_norm(v_t[n, h, s].tolist()) for s in range(seq)]
            for c in range(d):
                num = sum(mask[s] * (ls[s][c] - lt[s][c]) ** 2 for s in range(seq))
                terms.append(num / mask_sum if mask_sum > 0 else 0.0)
    return weight * sum(terms) / len(terms)


def distill_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img, heads, num_k, seq, d = 3, 2, 4, 6, 3
    v_s = torch.randn(n_img, heads, seq, d, generator=g)
    v_t = torch.randn(n_img, heads, seq, d, generator=g)
    padding = torch.zeros(n_img, seq, dtype=torch.bool)
    padding[0, 4:] = True
    padding[2, 1] = True
    logits = 3 * torch.randn(n_img, heads, num_k, seq, generator=g)
    logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    is_real = torch.tensor([[True, True, False, False], [True, False, False, False], [False] * 4])
    return v_s, v_t, logits, is_real, padding


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_loss_matches_naive_loops(temperature):
    v_s, v_t, logits, is_real, padding = distill_inputs()
    mask = distillation_mask(logits, is_real, temperature)
    assert (mask[0, :, 4:] == 0).all() and (mask[2] == 0).all()
    # each real query's softmax sums to one over positions
    assert torch.allclose(mask[0].sum(-1), torch.full((2,), 2.0))
    loss = distillation_loss(v_s, v_t, mask, padding, weight=8.0)
    expected = naive_distill(v_s, v_t, logits, is_real, temperature, 8.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_image_without_real_queries_counts_as_zero_in_the_mean():
    v_s, v_t, logits, is_real, padding = distill_inputs(1)
    loss_all = distillation_loss(v_s, v_t, distillation_mask(logits, is_real), padding, 1.0)
    loss_two = distillation_loss(v_s[:2], v_t[:2], distillation_mask(logits[:2], is_real[:2]), padding[:2], 1.0)
    # image 2 has no ground truth: it adds 0 and still counts (reference: mean over all images)
    assert loss_all.item() == pytest.approx(loss_two.item() * 2 / 3, rel=1e-6)


def test_distillation_gradients_reach_student_values_only():
    v_s, v_t, logits, is_real, padding = distill_inputs(2)
    v_s.requires_grad_()
    v_t.requires_grad_()
    logits.requires_grad_()
    distillation_loss(v_s, v_t, distillation_mask(logits, is_real), padding, 8.0).backward()
    assert v_s.grad is not None and v_s.grad.abs().sum() > 0
    assert v_t.grad is None and logits.grad is None
    assert (v_s.grad[0, :, 4:] == 0).all() and (v_s.grad[2] == 0).all()


def test_no_real_query_at_all_gives_zero_with_a_graph():
    v_s, v_t, logits, _, padding = distill_inputs(3)
    v_s.requires_grad_()
    loss = distillation_loss(v_s, v_t, distillation_mask(logits, torch.zeros(3, 4, dtype=torch.bool)), padding, 8.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (v_s.grad == 0).all()


def aux_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(2, 4, 5, generator=g)
    xy = torch.rand(2, 4, 2, generator=g) * 0.5
    wh = 0.05 + torch.rand(2, 4, 2, generator=g) * 0.4
    boxes = torch.cat([xy, xy + wh], -1)
    ref = (xy + wh / 2) + (torch.rand(2, 4, 2, generator=g) - 0.5) * 0.6 * wh
    is_real = torch.tensor([[True, True, False, False], [True, False, False, False]])
    padding = torch.tensor([[False, False, False, True], [False, False, False, False]])
    return aux, boxes, ref, is_real, padding


def test_identification_loss_matches_naive_bce_over_non_padded():
    aux, _, _, is_real, padding = aux_inputs()
    total, count = 0.0, 0
    for n in range(2):
        for k in range(4):
            if padding[n, k]:
                continue
            p = 1 / (1 + math.exp(-aux[n, k, 0].item()))
            y = float(is_real[n, k])
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    assert identification_loss(aux, is_real, padding).item() == pytest.approx(total / count, rel=1e-5)


def test_localisation_loss_matches_naive_relative_l1_over_real():
    aux, boxes, ref, is_real, _ = aux_inputs(1)
    total, count = 0.0, 0
    for n in range(2):
        for k in range(4):
            if not is_real[n, k]:
                continue
            x1, y1, x2, y2 = boxes[n, k].tolist()
            rx, ry = ref[n, k].tolist()
            gt = [rx - x1, ry - y1, x2 - rx, y2 - ry]
            extent = [x2 - x1, y2 - y1, x2 - x1, y2 - y1]
            pred = [1 / (1 + math.exp(-aux[n, k, 1 + j].item())) for j in range(4)]
            total += sum(abs(pred[j] - gt[j]) / extent[j] for j in range(4))
            count += 1
    assert localisation_loss(aux, boxes, ref, is_real).item() == pytest.approx(total / count, rel=1e-5)


def test_localisation_without_real_queries_is_zero_with_a_graph():
    aux, boxes, ref, _, _ = aux_inputs(2)
    aux.requires_grad_()
    loss = localisation_loss(aux, boxes, ref, torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert aux.grad is not None and (aux.grad == 0).all()
