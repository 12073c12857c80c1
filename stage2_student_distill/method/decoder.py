"""The instance-conditional decoder (docs/METHOD.md, section 3) and its auxiliary predictor.

Instance queries attend to the teacher's FPN tokens in one cross-attention layer (no self-attention).
The attention is written out by hand rather than with nn.MultiheadAttention because the distillation
needs two intermediate results that module does not expose: the per-head PRE-softmax logits
A[N, heads, K, S] (padding at -inf) and the per-head value projection V_t[N, heads, S, d] taken before
the output projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MLP

from detection.errors import UserError
from stage2_student_distill.method.tokens import SINE_FEATURES

# DISTILL.KEY_NORM: "" = the teacher tokens enter the keys as they are (the paper); "LN" = layer-normalised
# (no affine) first, docs/METHOD.md, section 9.1.
KEY_NORMS = ("", "LN")
# DISTILL.SPATIAL_PRIOR: "" = the paper's attention; "gaussian" = a Gaussian around each query's reference
# point added to the attention logits (GaussianSpatialPrior), docs/METHOD.md, section 9.2.
SPATIAL_PRIORS = ("", "gaussian")


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[N, L, C] -> [N, heads, L, C / heads]."""
    n, length, channels = x.shape
    return x.reshape(n, length, num_heads, channels // num_heads).transpose(1, 2)


def check_heads(channels: int, num_heads: int) -> None:
    """DISTILL.NUM_HEADS must divide the channels (checked when the modules are built)."""
    if num_heads < 1 or channels % num_heads:
        raise UserError(
            f"DISTILL.NUM_HEADS={num_heads} does not divide the {channels} FPN channels",
            "choose a head count that divides the channels (default 8 for 256 channels)",
        )


@dataclass
class DecoderOutput:
    """What the decoder keeps: decoded queries, pre-softmax logits and the teacher's value projection."""

    queries: Tensor  # [N, K, C] decoded queries
    logits: Tensor  # [N, heads, K, S] pre-softmax attention logits, -inf at padding positions
    values: Tensor  # [N, heads, S, d] value projection of the teacher tokens (before the output projection)


class GaussianSpatialPrior(nn.Module):
    """The log of a Gaussian around each query's reference point, added to every head's attention logits.

    bias[n, h, k, s] = -|p_s - r_k|^2 / (2 sigma[n, k, h]^2), with p_s the token's centre and r_k the
    query's (jittered) reference point, both in coordinates normalised by the image's (w, h). Each query
    predicts its own width per head, log sigma = Linear(query), the Linear zero-initialised with bias
    log(sigma0): every query starts at `sigma0` and may learn widths from what it is told (its scale
    indicator). Like SMCA's spatially modulated co-attention (Gao et al., ICCV 2021), which makes DETR's
    cross-attention find its object in a fraction of the iterations: without it, attending to the
    reference point has to be learnt from scratch by the query encoder and the key projection.
    """

    def __init__(self, channels: int, num_heads: int, sigma0: float = 0.15) -> None:
        super().__init__()
        if not 0 < sigma0:
            raise UserError(
                f"DISTILL.SPATIAL_PRIOR_SIGMA={sigma0} must be positive",
                "use a width in normalised image units such as 0.15",
            )
        self.log_sigma = nn.Linear(channels, num_heads)
        nn.init.zeros_(self.log_sigma.weight)
        nn.init.constant_(self.log_sigma.bias, math.log(sigma0))

    def forward(self, queries: Tensor, ref_points: Tensor, token_xy: Tensor) -> Tensor:
        """queries [N, K, C], ref_points [N, K, 2], token_xy [N, S, 2] -> bias [N, heads, K, S]."""
        inv_var = torch.exp(-2.0 * self.log_sigma(queries)).transpose(1, 2)[..., None]  # [N, heads, K, 1]
        d2 = (ref_points[:, :, None, :] - token_xy[:, None, :, :]).pow(2).sum(-1)  # [N, K, S]
        return -0.5 * d2[:, None] * inv_var


class InstanceConditionalDecoder(nn.Module):
    """One cross-attention layer + FFN, post-norm: q = LN(q + attn(q)); q = LN(q + FFN(q)).

    Keys = k_proj(key_norm(tokens) + pos_proj(position)); values = v_proj(tokens), never normalised here
    (the distillation loss normalises them per head). With a spatial prior, its bias is part of the
    logits A (so of the distillation mask too).
    """

    def __init__(
        self,
        channels: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        pos_dim: int = 2 * SINE_FEATURES,
        key_norm: str = "",
        spatial_prior: str = "",
        prior_sigma: float = 0.15,
    ) -> None:
        super().__init__()
        check_heads(channels, num_heads)
        if key_norm not in KEY_NORMS:
            raise UserError(
                f"DISTILL.KEY_NORM={key_norm!r} is not one of {list(KEY_NORMS)}",
                'use "" (the paper: raw teacher features in the keys) or "LN" (layer-normalised)',
            )
        # no parameters: a key-normalised decoder has the paper's state dict
        self.key_norm = nn.LayerNorm(channels, elementwise_affine=False) if key_norm == "LN" else nn.Identity()
        if spatial_prior not in SPATIAL_PRIORS:
            raise UserError(
                f"DISTILL.SPATIAL_PRIOR={spatial_prior!r} is not one of {list(SPATIAL_PRIORS)}",
                'use "" (the paper) or "gaussian"',
            )
        self.spatial_prior = GaussianSpatialPrior(channels, num_heads, prior_sigma) if spatial_prior else None
        self.channels = channels
        self.num_heads = num_heads
        self.pos_proj = nn.Linear(pos_dim, channels)
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, channels))
        self.norm2 = nn.LayerNorm(channels)

    def forward(
        self,
        queries: Tensor,
        tokens: Tensor,
        pos_embedding: Tensor,
        key_padding: Tensor,
        ref_points: Tensor | None = None,
        token_xy: Tensor | None = None,
    ) -> DecoderOutput:
        """queries [N, K, C]; teacher tokens [N, S, C]; pos_embedding [N, S, 256]; key_padding [N, S] (True = pad);
        ref_points [N, K, 2] and token_xy [N, S, 2] (normalised (x, y)): needed with a spatial prior only."""
        head_dim = self.channels // self.num_heads
        keys = self.key_norm(tokens) + self.pos_proj(pos_embedding)  # [N, S, C]
        q = split_heads(self.q_proj(queries), self.num_heads) * head_dim**-0.5  # [N, heads, K, d]
        k = split_heads(self.k_proj(keys), self.num_heads)  # [N, heads, S, d]
        v = split_heads(self.v_proj(tokens), self.num_heads)  # [N, heads, S, d]
        pad = key_padding[:, None, None, :]  # [N, 1, 1, S]
        logits = torch.matmul(q, k.transpose(-1, -2))  # [N, heads, K, S]
        if self.spatial_prior is not None:
            assert ref_points is not None and token_xy is not None, "a spatial prior needs ref_points and token_xy"
            logits = logits + self.spatial_prior(queries, ref_points, token_xy)  # [N, heads, K, S]
        # masked_fill (not +=) also replaces any non-finite value computed from padded features
        logits = logits.masked_fill(pad, float("-inf"))
        weights = logits.softmax(dim=-1)
        # zero padded values too, so that even inf/nan padding cannot leak through 0 * inf
        attended = torch.matmul(weights, v.masked_fill(key_padding[:, None, :, None], 0.0))  # [N, heads, K, d]
        attended = attended.transpose(1, 2).reshape(queries.shape)  # [N, K, heads, d] -> [N, K, C]
        decoded = self.norm1(queries + self.out_proj(attended))
        decoded = self.norm2(decoded + self.ffn(decoded))
        return DecoderOutput(queries=decoded, logits=logits, values=v)


class AuxiliaryPredictor(nn.Module):
    """Decoded query -> 5 outputs: [0] real/fake logit, [1:5] left/top/right/bottom distance logits."""

    def __init__(self, channels: int = 256, hidden_dim: int = 256) -> None:
        super().__init__()
        self.mlp = MLP(channels, [hidden_dim, hidden_dim, 5])

    def forward(self, decoded: Tensor) -> Tensor:
        return self.mlp(decoded)


def predicted_distances(aux_out: Tensor) -> Tensor:
    """Normalised distances from the reference point to the left/top/right/bottom edges, in (0, 1)."""
    return F.sigmoid(aux_out[..., 1:5])
