"""The instance-conditional decoder: explicit attention equals torch's MHA, logits keep -inf at padding,
and padded positions cannot influence anything."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detection.errors import UserError
from stage2_student_distill.method.decoder import InstanceConditionalDecoder

torch.set_num_threads(1)
C, HEADS = 16, 4


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(2, 3, C, generator=g)
    tokens = torch.randn(2, 7, C, generator=g)
    pos = torch.randn(2, 7, 256, generator=g)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 5:] = True
    padding[1, 2] = True
    return queries, tokens, pos, padding


def test_matches_torch_multihead_attention_and_post_norm_ffn():
    torch.manual_seed(0)
    dec = InstanceConditionalDecoder(C, HEADS, ffn_dim=32).eval()
    queries, tokens, pos, padding = inputs()
    out = dec(queries, tokens, pos, padding)

    mha = nn.MultiheadAttention(C, HEADS, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([dec.q_proj.weight, dec.k_proj.weight, dec.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([dec.q_proj.bias, dec.k_proj.bias, dec.v_proj.bias]))
        mha.out_proj.weight.copy_(dec.out_proj.weight)
        mha.out_proj.bias.copy_(dec.out_proj.bias)
        keys = tokens + dec.pos_proj(pos)
        attn, weights = mha(queries, keys, tokens, key_padding_mask=padding, average_attn_weights=False)
        x = dec.norm1(queries + attn)
        expected = dec.norm2(x + dec.ffn(x))
    assert torch.allclose(out.queries, expected, atol=1e-5)
    assert out.logits.shape == (2, HEADS, 3, 7)
    assert torch.allclose(out.logits.softmax(-1), weights, atol=1e-6)
    # the value projection is kept per head, before the output projection
    v = dec.v_proj(tokens).reshape(2, 7, HEADS, C // HEADS).transpose(1, 2)
    assert torch.allclose(out.values, v)


def test_logits_are_pre_softmax_with_minus_inf_at_padding():
    torch.manual_seed(1)
    dec = InstanceConditionalDecoder(C, HEADS, ffn_dim=32)
    queries, tokens, pos, padding = inputs()
    out = dec(queries, tokens, pos, padding)
    d = C // HEADS
    q = dec.q_proj(queries)
    k = dec.k_proj(tokens + dec.pos_proj(pos))
    for n in range(2):
        for h in range(HEADS):
            for kk in range(3):
                for s in range(7):
                    value = out.logits[n, h, kk, s]
                    if padding[n, s]:
                        assert value == float("-inf")
                    else:
                        dot = (q[n, kk, h * d : (h + 1) * d] * k[n, s, h * d : (h + 1) * d]).sum() / d**0.5
                        assert value.item() == pytest.approx(dot.item(), rel=1e-5, abs=1e-6)


def test_padded_positions_do_not_change_any_output():
    torch.manual_seed(2)
    dec = InstanceConditionalDecoder(C, HEADS, ffn_dim=32)
    queries, tokens, pos, padding = inputs()
    a = dec(queries, tokens, pos, padding)
    tokens2, pos2 = tokens.clone(), pos.clone()
    tokens2[padding] = 1e4 * torch.randn(int(padding.sum()), C)
    pos2[padding] = torch.randn(int(padding.sum()), 256)
    b = dec(queries, tokens2, pos2, padding)
    assert torch.equal(a.queries, b.queries)
    assert torch.equal(a.logits, b.logits)
    valid = ~padding[:, None, :, None].expand_as(a.values)
    assert torch.equal(a.values[valid], b.values[valid])


def test_heads_must_divide_channels():
    with pytest.raises(UserError, match="NUM_HEADS"):
        InstanceConditionalDecoder(18, 4)
