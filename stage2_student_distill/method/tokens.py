"""FPN levels as one token sequence: flattening, the padding mask and the DETR-style position embedding.

Why one module: the decoder, the distillation loss and the attention-mask visualisation must all agree
on the same token order (levels in the given order, each level row-major) and on which tokens are
padding. docs/METHOD.md, section 1: a level of stride s is valid for rows < ceil(h / s) and
cols < ceil(w / s), with (h, w) the resized image size before batch padding (cache_contract's
`level_size`, the same rule stage one cuts the cached regions with).

The ICD module checked its levels and strides when it was built and each batch at its entry
(ICDModule.check_batch); the shape contracts here are asserts.

Written by hand (not torchvision/timm): the DETR sine embedding is a few lines and no installed library
exposes it for an arbitrary validity mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cache_contract.geometry import level_size

# Features per axis of the position embeddings (x and y each), docs/METHOD.md, sections 2 and 3.
SINE_FEATURES = 128
SINE_TEMPERATURE = 10000.0

Strides = Mapping[str, int] | Sequence[int]
ImageSizes = Sequence[Sequence[int]]


def strides_for(levels: Sequence[str], strides: Strides) -> list[int]:
    """The stride of each level in `levels`' order, from a {level: stride} mapping or an aligned sequence."""
    if isinstance(strides, Mapping):
        return [int(strides[lvl]) for lvl in levels]
    assert len(strides) == len(levels), f"{len(strides)} strides for {len(levels)} levels"
    return [int(s) for s in strides]


def level_shapes(features: Mapping[str, Tensor], levels: Sequence[str]) -> list[tuple[int, int]]:
    """(H, W) of each level of `features` ({level: [N, C, H, W]}), in `levels`' order."""
    return [(int(features[lvl].shape[2]), int(features[lvl].shape[3])) for lvl in levels]


def flatten_levels(features: Mapping[str, Tensor], levels: Sequence[str]) -> Tensor:
    """Concatenate the levels into tokens [N, S, C], each level flattened row-major, levels in order."""
    # [N, C, H, W] -> [N, C, HW] -> [N, HW, C] per level, then concatenated along the tokens
    return torch.cat([features[lvl].flatten(2).transpose(1, 2) for lvl in levels], dim=1)


def unflatten_levels(tokens: Tensor, shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Split the last (token) axis of `tokens` [..., S] back into per-level maps [..., H, W]."""
    sizes = [h * w for h, w in shapes]
    assert tokens.shape[-1] == sum(sizes), f"last axis has {tokens.shape[-1]} tokens, the levels hold {sum(sizes)}"
    parts = torch.split(tokens, sizes, dim=-1)
    return [part.reshape(*part.shape[:-1], h, w) for part, (h, w) in zip(parts, shapes)]


def valid_level_masks(
    image_sizes: ImageSizes,
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Per level, bool [N, H, W], True inside the image: rows < ceil(h / s), cols < ceil(w / s)."""
    assert len(shapes) == len(strides), f"{len(strides)} strides for {len(shapes)} levels"
    masks = []
    for (height, width), stride in zip(shapes, strides):
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        valid = torch.zeros(len(image_sizes), height, width, dtype=torch.bool, device=device)
        for i, (h, w) in enumerate(image_sizes):
            valid_h, valid_w = level_size(int(h), int(w), stride)
            valid[i] = (rows[:, None] < valid_h) & (cols[None, :] < valid_w)
        masks.append(valid)
    return masks


def padding_mask(
    image_sizes: ImageSizes,
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str | None = None,
) -> Tensor:
    """bool [N, S], True at padding positions (outside the image), in flatten_levels' token order."""
    masks = valid_level_masks(image_sizes, shapes, strides, device)
    return torch.cat([~m.flatten(1) for m in masks], dim=1)


def sine_features(values: Tensor, num_feats: int = SINE_FEATURES, temperature: float = SINE_TEMPERATURE) -> Tensor:
    """[..., num_feats]: feature i = sin(v / T^(2*floor(i/2)/num_feats)) for even i, cos(...) for odd i.

    `values` are angles already scaled (callers multiply normalised coordinates by 2*pi).
    """
    index = torch.arange(num_feats, device=values.device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    angles = values.float()[..., None] / dim_t
    out = torch.empty_like(angles)
    out[..., 0::2] = angles[..., 0::2].sin()
    out[..., 1::2] = angles[..., 1::2].cos()
    return out


def sine_position_embedding(
    valid: Tensor, num_feats: int = SINE_FEATURES, temperature: float = SINE_TEMPERATURE
) -> Tensor:
    """DETR's normalised 2D sine embedding of a validity mask [N, H, W] -> [N, 2*num_feats, H, W] (y then x).

    Coordinates are the cumulative count of valid positions along each axis divided by the axis' valid
    length, times 2*pi, so the embedding spans the image, not the padded batch.
    """
    eps = 1e-6
    valid_f = valid.float()
    y_embed = valid_f.cumsum(1)
    x_embed = valid_f.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * (2 * math.pi)
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * (2 * math.pi)
    pos = torch.cat(
        [sine_features(y_embed, num_feats, temperature), sine_features(x_embed, num_feats, temperature)], dim=-1
    )
    return pos.permute(0, 3, 1, 2)


def position_embedding(
    image_sizes: ImageSizes,
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str | None = None,
    num_feats: int = SINE_FEATURES,
    temperature: float = SINE_TEMPERATURE,
) -> Tensor:
    """Per-level sine position embeddings flattened like the tokens: [N, S, 2*num_feats]."""
    masks = valid_level_masks(image_sizes, shapes, strides, device)
    return torch.cat(
        [sine_position_embedding(m, num_feats, temperature).flatten(2).transpose(1, 2) for m in masks], dim=1
    )


def token_centres(
    shapes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device | str | None = None
) -> Tensor:
    """[S, 2] (x, y) pixel centre of every token, in flatten_levels' order (levels, then row-major)."""
    centres = []
    for (height, width), stride in zip(shapes, strides):
        ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        centres.append(torch.stack([xs, ys], -1).reshape(-1, 2).float().add(0.5).mul(stride))
    return torch.cat(centres)


def normalised_token_centres(
    image_sizes: ImageSizes,
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str | None = None,
) -> Tensor:
    """[N, S, 2] token centres divided by each image's resized (w, h): the frame of the reference points."""
    wh = torch.tensor([[w, h] for h, w in image_sizes], dtype=torch.float32, device=device)  # [N, 2]
    return token_centres(shapes, strides, device)[None] / wh[:, None]
