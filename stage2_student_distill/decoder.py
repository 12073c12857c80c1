"""The instance-conditional decoder (docs/METHOD.md, section 3) and its auxiliary predictor.

Instance queries attend to the teacher's FPN tokens in one cross-attention layer (no self-attention).
The attention is written out by hand rather than with nn.MultiheadAttention because the distillation
needs two intermediate results that module does not expose: the per-head PRE-softmax logits
A[N, heads, K, S] (padding at -inf) and the per-head value projection V_t[N, heads, S, d] taken before
the output projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MLP

from detection.errors import UserError
from stage2_student_distill.tokens import SINE_FEATURES


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


class InstanceConditionalDecoder(nn.Module):
    """One cross-attention layer + FFN, post-norm: q = LN(q + attn(q)); q = LN(q + FFN(q))."""

    def __init__(self, channels: int = 256, num_heads: int = 8, ffn_dim: int = 1024,
                 pos_dim: int = 2 * SINE_FEATURES) -> None:
        super().__init__()
        check_heads(channels, num_heads)
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

    def forward(self, queries: Tensor, tokens: Tensor, pos_embedding: Tensor, key_padding: Tensor) -> DecoderOutput:
        """queries [N, K, C]; teacher tokens [N, S, C]; pos_embedding [N, S, 256]; key_padding [N, S] (True = pad)."""
        head_dim = self.channels // self.num_heads
        keys = tokens + self.pos_proj(pos_embedding)  # [N, S, C]
        q = split_heads(self.q_proj(queries), self.num_heads) * head_dim ** -0.5  # [N, heads, K, d]
        k = split_heads(self.k_proj(keys), self.num_heads)  # [N, heads, S, d]
        v = split_heads(self.v_proj(tokens), self.num_heads)  # [N, heads, S, d]
        pad = key_padding[:, None, None, :]  # [N, 1, 1, S]
        # masked_fill (not +=) also replaces any non-finite value computed from padded features
        logits = torch.matmul(q, k.transpose(-1, -2)).masked_fill(pad, float("-inf"))  # [N, heads, K, S]
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
