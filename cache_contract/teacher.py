"""The frozen teacher: built from the config, loaded from MODEL.WEIGHTS, run without gradients.

Stage one dumps what `sample_features` returns; stage two's --online mode produces the same tensors
live with the same function, so a lossless cache and a live teacher give identical inputs to ICD.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from cache_contract.geometry import padded_shape, valid_region
from detection.checkpoint import load_weights
from detection.errors import UserError
from detection.zoo import DetectorAdapter, build_detector


def load_teacher(cfg: Any, num_classes: int, device: torch.device) -> DetectorAdapter:
    """Build MODEL.META_ARCHITECTURE for K=`num_classes` classes and load MODEL.WEIGHTS, frozen in eval mode."""
    if not cfg.MODEL.WEIGHTS:
        raise UserError(
            "stage one needs a trained teacher, but MODEL.WEIGHTS is empty",
            "pass MODEL.WEIGHTS /path/to/teacher/model_final.pth (train one with `icd train`)",
        )
    teacher = build_detector(cfg, num_classes + 1)
    load_weights(teacher, cfg.MODEL.WEIGHTS)
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA when asked (SOLVER.AMP); a no-op elsewhere (CPU runs stay fp32 and exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def teacher_features(teacher: DetectorAdapter, images: Sequence[Tensor], levels: Sequence[str],
                     amp: bool = False) -> dict[str, Tensor]:
    """FPN features {level: [N, C, H, W]} float32 of images that share one padded shape."""
    device = next(teacher.parameters()).device
    with autocast_for(device, amp):
        batched = teacher.preprocess([image.to(device, non_blocking=True) for image in images]).tensors
        features = teacher.features(batched)
    return {name: features[name].float() for name in levels}


def sample_features(teacher: DetectorAdapter, images: Sequence[Tensor], levels: Sequence[str],
                    amp: bool = False) -> list[dict[str, Tensor]]:
    """Per image, each level cut to its valid region [C, ceil(h / s), ceil(w / s)]: what a cache sample holds.

    The images must share one padded shape: a sample's features then depend on the sample alone (padding
    reaches into the valid region through the receptive field, so mixing shapes would change them).
    """
    shapes = {padded_shape(image.shape[-2], image.shape[-1], teacher.size_divisibility) for image in images}
    assert len(shapes) == 1, f"images of several padded shapes {sorted(shapes)} in one teacher batch"
    features = teacher_features(teacher, images, levels, amp)
    return [{name: valid_region(features[name][row], teacher.strides[name], image.shape[-2], image.shape[-1])
             for name in levels} for row, image in enumerate(images)]


def fpn_and_head_weights(teacher: DetectorAdapter) -> dict[str, np.ndarray]:
    """The teacher's FPN + head tensors as numpy, for the cache's teacher_weights blob."""
    return {key: value.detach().cpu().numpy() for key, value in teacher.fpn_and_head_state_dict().items()}
