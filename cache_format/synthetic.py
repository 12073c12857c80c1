"""Synthetic teacher features shaped like real FPN output, for tests, benchmarks and planning demos.

Real FPN maps are spatially smooth (3x3 convs over upsampled coarser levels), signed, and each
channel has its own scale and bias. This makes low-pass filtered Gaussian noise with per-channel
log-normal scales and Gaussian biases, which compresses and quantizes like such maps do (white noise
would be far less compressible; constants far more). Deterministic given the generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cache_format.schema import LevelSpec


def _box_blur(x: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Mean over a (2 * radius + 1) window along `axis`, edges clamped; via a cumulative sum (O(n))."""
    if radius <= 0 or x.shape[axis] == 1:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis, dtype=np.float32)
    n = x.shape[axis]
    hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return (hi - lo) / np.float32(2 * radius + 1)


def smooth_field(rng: np.random.Generator, channels: int, h: int, w: int, radius: int = 2) -> np.ndarray:
    """Unit-variance, spatially correlated noise [C, h, w] (two box blurs ~ a Gaussian of sigma ~ radius)."""
    x = rng.standard_normal((channels, h, w), dtype=np.float32)
    for axis in (1, 2):
        x = _box_blur(_box_blur(x, radius, axis), radius, axis)
    std = x.reshape(channels, -1).std(axis=1)
    std[std == 0] = 1.0
    return x / std[:, None, None].astype(np.float32)


def fpn_like_features(
    rng: np.random.Generator, levels: Sequence[LevelSpec], resized_h: int, resized_w: int, radius: int = 2
) -> dict[str, np.ndarray]:
    """One sample's float32 features {level: [C, ceil(h/stride), ceil(w/stride)]}."""
    out = {}
    for lv in levels:
        h, w = lv.valid_size(resized_h, resized_w)
        scale = np.exp(rng.normal(0.0, 0.5, lv.channels)).astype(np.float32)
        bias = (rng.normal(0.0, 0.3, lv.channels) * scale).astype(np.float32)
        x = smooth_field(rng, lv.channels, h, w, radius)
        out[lv.name] = x * scale[:, None, None] + bias[:, None, None]
    return out
