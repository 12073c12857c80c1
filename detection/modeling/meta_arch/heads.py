"""What the meta-architectures' builders share: GroupNorm sizing, anchor base sizes, test-time thresholds."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from detection.errors import UserError

# torchvision's default anchor base sizes, one per level (used when MODEL.ANCHOR_GENERATOR.SIZES is empty).
DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)


def anchor_sizes(cfg: Any) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in (cfg.MODEL.ANCHOR_GENERATOR.SIZES or DEFAULT_ANCHOR_SIZES))
    if len(sizes) != 5 or any(s <= 0 for s in sizes):
        raise UserError(
            f"MODEL.ANCHOR_GENERATOR.SIZES {list(sizes)} must hold 5 positive base sizes, one per FPN level.",
            "use e.g. [32, 64, 128, 256, 512] (or [] for torchvision's default).",
        )
    return sizes


def group_norm(channels: int, what: str) -> Callable[[int], nn.Module]:
    """GroupNorm(32) as torchvision's heads use, but 16 groups for a 32-channel FPN.

    With 32 channels GroupNorm(32) normalises single values on a 1x1 P7 of one image and torch
    refuses it; the group count has no parameters, so state dicts stay torchvision's.
    """
    if channels % 32:
        raise UserError(
            f"{what} needs MODEL.FPN.OUT_CHANNELS divisible by 32 (its head uses GroupNorm); got {channels}.",
            "set MODEL.FPN.OUT_CHANNELS to a multiple of 32 (e.g. 32, 64, 256).",
        )
    return partial(nn.GroupNorm, 32 if channels >= 64 else 16)


def test_options(cfg: Any) -> dict[str, Any]:
    """Score threshold, NMS threshold and detections per image, in torchvision's single-stage argument names."""
    return dict(
        score_thresh=float(cfg.MODEL.SCORE_THRESH_TEST),
        nms_thresh=float(cfg.MODEL.NMS_THRESH_TEST),
        detections_per_img=int(cfg.TEST.DETECTIONS_PER_IMAGE),
    )
