"""The frozen teacher: built from the config, loaded from MODEL.WEIGHTS, run without gradients."""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

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
def teacher_features(
    teacher: DetectorAdapter, images: list[torch.Tensor], levels: list[str], amp: bool = False
) -> dict[str, torch.Tensor]:
    """FPN features of a batch of equally padded images, as float32 on the teacher's device."""
    device = next(teacher.parameters()).device
    with autocast_for(device, amp):
        batched = teacher.preprocess([image.to(device, non_blocking=True) for image in images]).tensors
        features = teacher.features(batched)
    return {name: features[name].float() for name in levels}


def valid_region(feature: torch.Tensor, stride: int, resized_h: int, resized_w: int) -> np.ndarray:
    """One sample's level [C, H, W] cut to its valid size ceil(h/stride) x ceil(w/stride), as numpy float32."""
    h, w = -(-resized_h // stride), -(-resized_w // stride)
    return feature[:, :h, :w].detach().to("cpu", torch.float32).contiguous().numpy()


def fpn_and_head_weights(teacher: DetectorAdapter) -> dict[str, np.ndarray]:
    """The teacher's FPN + head tensors as numpy, for the cache's teacher_weights blob."""
    return {key: value.detach().cpu().numpy() for key, value in teacher.fpn_and_head_state_dict().items()}
