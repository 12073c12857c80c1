"""ICD's losses: the auxiliary identification/localisation losses (docs/METHOD.md, section 3) that train
the query encoder and decoder on teacher features, and the instance-conditional distillation loss
(section 4), the only one that reaches the student.

Images without real queries (no ground truth) have an all-zero distillation mask. As in the authors'
reference code (megvii-research/ICD, `mimic_loss`: per-(n, h, c) terms divided by the mask sum clamped
to 1e-6, then `.mean()` over all of them), such an image contributes exactly zero and still counts in
the mean over images. This keeps lambda calibrated as in the paper; a batch with no ground truth at
all gives a loss of 0 that is still connected to the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage2_student_distill.method.decoder import check_heads, predicted_distances, split_heads

MASK_SUM_EPS = 1e-6  # the reference's clamp on the mask sum; only matters for all-zero masks


def identification_loss(aux_out: Tensor, is_real: Tensor, padding: Tensor) -> Tensor:
    """BCE-with-logits of aux output 0 against real (1) / fake (0), averaged over non-padded queries."""
    per_query = F.binary_cross_entropy_with_logits(aux_out[..., 0], is_real.to(aux_out.dtype), reduction="none")
    valid = ~padding
    return torch.where(valid, per_query, torch.zeros_like(per_query)).sum() / valid.sum().clamp(min=1)


def binary_entropy(p: float | Tensor) -> Tensor:
    """H(p) in nats, 0 at p = 0 or 1: the BCE of always predicting the real fraction p."""
    p = torch.as_tensor(p, dtype=torch.float64).clamp(0.0, 1.0)
    q = 1.0 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q))


def prior_entropy(is_real: Tensor, padding: Tensor) -> Tensor:
    """The entropy of a batch's real/fake ratio over its non-padded queries (a float64 scalar)."""
    valid = ~padding
    return binary_entropy(is_real[valid].double().mean() if valid.any() else 0.0)


def edge_distances(boxes: Tensor, ref_points: Tensor) -> Tensor:
    """Normalised distances [..., 4] from the reference point to the box's left, top, right, bottom edges."""
    return torch.cat([ref_points - boxes[..., :2], boxes[..., 2:] - ref_points], dim=-1)


def localisation_loss(aux_out: Tensor, boxes: Tensor, ref_points: Tensor, is_real: Tensor) -> Tensor:
    """Sum over sides of |pred - gt| / (gt + gt_opposite), averaged over real queries (relative to box w/h).

    With no real query in the batch the loss is 0 but still depends on aux_out, so every parameter
    gets a (zero) gradient and distributed training sees the same graph on every rank.
    """
    gt = edge_distances(boxes, ref_points)
    extent = (gt + gt[..., [2, 3, 0, 1]]).clamp(min=1e-7)  # width for left/right, height for top/bottom
    per_query = ((predicted_distances(aux_out) - gt).abs() / extent).sum(-1)
    per_query = torch.where(is_real, per_query, torch.zeros_like(per_query))
    return per_query.sum() / is_real.sum().clamp(min=1)


class StudentValueProjection(nn.Module):
    """The student side's value projection (same shape as the decoder's): tokens [N, S, C] -> V_s [N, h, S, d].

    Only this projection of the student-side attention module is ever used, so only it is built
    (no unused parameters, which distributed training would otherwise have to be told about).
    """

    def __init__(self, channels: int = 256, num_heads: int = 8) -> None:
        super().__init__()
        check_heads(channels, num_heads)
        self.num_heads = num_heads
        self.v_proj = nn.Linear(channels, channels)

    def forward(self, tokens: Tensor) -> Tensor:
        return split_heads(self.v_proj(tokens), self.num_heads)


@torch.no_grad()
def distillation_mask(logits: Tensor, is_real: Tensor, temperature: float = 1.0) -> Tensor:
    """W[n, h, s] = sum over real queries k of softmax_s(A[n, h, k, s] / T); detached, 0 at padding."""
    weights = (logits.float() / temperature).softmax(dim=-1)
    return torch.einsum("nhks,nk->nhs", weights, is_real.float())


def distillation_loss(
    student_values: Tensor, teacher_values: Tensor, mask: Tensor, key_padding: Tensor, weight: float
) -> Tensor:
    """lambda * mean over (n, h, c) of sum_s W (LN(V_s) - LN(V_t))^2 / sum_s W; V_t and W detached.

    student_values, teacher_values: [N, h, S, d]; mask: [N, h, S]; key_padding: [N, S] (True = padding).
    """
    d = student_values.shape[-1]
    v_s = F.layer_norm(student_values.float(), (d,))
    v_t = F.layer_norm(teacher_values.detach().float(), (d,))
    squared = (v_s - v_t).pow(2)  # [N, h, S, d]
    # padded positions have W == 0; zeroing them too keeps whatever the padding holds out of the value
    squared = squared.masked_fill(key_padding[:, None, :, None], 0.0)
    mask = mask.detach().float()
    # sum_s W (.)^2 / sum_s W per (n, head, channel): [N, h, d]
    per_channel = torch.einsum("nhs,nhsc->nhc", mask, squared) / mask.sum(-1, keepdim=True).clamp(min=MASK_SUM_EPS)
    return weight * per_channel.mean()
