"""Where an image's features are in a level, and how per-sample regions become a padded batch.

Stage one stores each sample's levels cut to its valid region; stage two (cached or live teacher)
zero-pads them to the student's batch shape. Both follow these functions, so a cached and a live
teacher give the student the same tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from cache_format.schema import level_size

__all__ = ["batch_padded_shape", "level_size", "pad_levels", "padded_shape", "valid_region"]


def padded_shape(height: int, width: int, size_divisibility: int) -> tuple[int, int]:
    """The shape an image of (height, width) takes once zero-padded to the size divisibility."""
    d = max(1, int(size_divisibility))
    return -(-int(height) // d) * d, -(-int(width) // d) * d


def batch_padded_shape(image_sizes: Iterable[Sequence[int]], size_divisibility: int) -> tuple[int, int]:
    """A batch's padded shape: the largest h and w of its images, rounded up to the size divisibility."""
    sizes = list(image_sizes)
    return padded_shape(max(int(s[0]) for s in sizes), max(int(s[1]) for s in sizes), size_divisibility)


def valid_region(feature: Tensor, stride: int, resized_h: int, resized_w: int) -> Tensor:
    """One sample's level [C, H, W] cut to the image's positions [C, ceil(h / s), ceil(w / s)]."""
    h, w = level_size(resized_h, resized_w, stride)
    return feature[:, :h, :w]


def pad_levels(
    per_sample: Sequence[Mapping[str, Tensor]],
    padded_hw: tuple[int, int],
    levels: Sequence[str],
    strides: Mapping[str, int],
) -> dict[str, Tensor]:
    """Stack per-sample valid regions [C, h, w] into zero-padded [N, C, ceil(H / s), ceil(W / s)] per level."""
    out: dict[str, Tensor] = {}
    for name in levels:
        first = per_sample[0][name]
        height, width = level_size(padded_hw[0], padded_hw[1], strides[name])
        batch = first.new_zeros((len(per_sample), first.shape[0], height, width))  # [N, C, H_l, W_l]
        for i, features in enumerate(per_sample):
            feature = features[name]
            h, w = feature.shape[-2:]
            # The regions come from samples of this batch, whose sizes made `padded_hw`.
            assert h <= height and w <= width, f"level {name} sample {i}: {h}x{w} > batch {height}x{width}"
            batch[i, :, :h, :w] = feature
        out[name] = batch
    return out
