"""Token layout of the ICD modules: level flattening, padding mask (ceil rule), DETR sine embedding."""

from __future__ import annotations

import math

import pytest
import torch

from stage2_student_distill.method.tokens import (
    flatten_levels,
    padding_mask,
    position_embedding,
    sine_features,
    strides_for,
    unflatten_levels,
)

torch.set_num_threads(1)


def test_flatten_levels_orders_levels_then_rows():
    torch.manual_seed(0)
    feats = {"p4": torch.randn(2, 3, 2, 3), "p3": torch.randn(2, 3, 4, 5)}
    tokens = flatten_levels(feats, ["p3", "p4"])
    assert tokens.shape == (2, 4 * 5 + 2 * 3, 3)
    for n in range(2):
        for r in range(4):
            for c in range(5):
                assert torch.equal(tokens[n, r * 5 + c], feats["p3"][n, :, r, c])
        for r in range(2):
            for c in range(3):
                assert torch.equal(tokens[n, 20 + r * 3 + c], feats["p4"][n, :, r, c])
    maps = unflatten_levels(tokens.transpose(1, 2), [(4, 5), (2, 3)])
    assert torch.equal(maps[0], feats["p3"]) and torch.equal(maps[1], feats["p4"])


def test_padding_mask_uses_ceil_of_odd_sizes():
    # 13 x 17 at stride 8 -> ceil: 2 x 3 valid; at stride 16 -> 1 x 2 valid
    sizes = [(13, 17), (32, 8)]
    shapes = [(4, 4), (2, 2)]
    mask = padding_mask(sizes, shapes, [8, 16])
    assert mask.shape == (2, 16 + 4) and mask.dtype == torch.bool
    expected = torch.ones(2, 20, dtype=torch.bool)
    for n, (h, w) in enumerate(sizes):
        offset = 0
        for (height, width), s in zip(shapes, [8, 16]):
            for r in range(height):
                for c in range(width):
                    if r < math.ceil(h / s) and c < math.ceil(w / s):
                        expected[n, offset + r * width + c] = False
            offset += height * width
    assert torch.equal(mask, expected)
    assert (~mask[0, :16]).sum() == 6 and (~mask[0, 16:]).sum() == 2
    assert (~mask[1, :16]).sum() == 4 and (~mask[1, 16:]).sum() == 2


def test_strides_follow_the_levels_order():
    assert strides_for(["p4", "p3"], {"p3": 8, "p4": 16}) == [16, 8]
    assert strides_for(["p4", "p3"], [16, 8]) == [16, 8]


def test_sine_features_formula():
    v = torch.tensor([0.7, 2.5])
    out = sine_features(v, num_feats=128)
    for j, value in enumerate(v.tolist()):
        for i in (0, 1, 2, 3, 64, 65, 126, 127):
            angle = value / 10000 ** (2 * (i // 2) / 128)
            ref = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert out[j, i].item() == pytest.approx(ref, abs=1e-6)


def test_position_embedding_is_normalised_over_the_valid_region():
    # one level 4 x 5, image valid 3 x 4 at stride 1; y features first, then x
    pos = position_embedding([(3, 4)], [(4, 5)], [1])
    assert pos.shape == (1, 20, 256)
    for r, c in [(0, 0), (1, 2), (2, 3)]:
        y = (r + 1) / 3 * 2 * math.pi
        x = (c + 1) / 4 * 2 * math.pi
        token = pos[0, r * 5 + c]
        for i in (0, 1, 10, 11, 127):
            div = 10000 ** (2 * (i // 2) / 128)
            trig = math.sin if i % 2 == 0 else math.cos
            assert token[i].item() == pytest.approx(trig(y / div), abs=1e-4)
            assert token[128 + i].item() == pytest.approx(trig(x / div), abs=1e-4)
    # the last valid row/col sits at 2*pi whatever the padded size
    bigger = position_embedding([(3, 4)], [(6, 9)], [1])
    assert torch.allclose(bigger[0, 2 * 9 + 3], pos[0, 2 * 5 + 3], atol=1e-5)
