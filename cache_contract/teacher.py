"""The frozen teacher: built from the config, loaded from MODEL.WEIGHTS, run without gradients.

Stage one dumps what `sample_features` returns; stage two's --online mode produces the same tensors
live with the same function, so a lossless cache and a live teacher give identical inputs to ICD.
`init_from_teacher` decides which of the teacher's stored FPN + head weights a student takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cache_contract.geometry import padded_shape, valid_region
from detection.engine.amp import autocast as amp_autocast
from detection.engine.checkpoint import load_weights
from detection.errors import UserError
from detection.modeling.architectures import ARCHITECTURES
from detection.modeling.detector import DetectorAdapter, build_detector


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


@torch.no_grad()
def teacher_features(
    teacher: DetectorAdapter, images: Sequence[Tensor], levels: Sequence[str], amp: bool = False
) -> dict[str, Tensor]:
    """FPN features {level: [N, C, H, W]} float32 of images that share one padded shape."""
    device = next(teacher.parameters()).device
    with amp_autocast(device, amp):  # SOLVER.AMP: fp16 on CUDA, bf16 on CPU; features returned in fp32
        batched = teacher.preprocess([image.to(device, non_blocking=True) for image in images]).tensors
        features = teacher.features(batched)
    return {name: features[name].float() for name in levels}


def sample_features(
    teacher: DetectorAdapter, images: Sequence[Tensor], levels: Sequence[str], amp: bool = False
) -> list[dict[str, Tensor]]:
    """Per image, each level cut to its valid region [C, ceil(h / s), ceil(w / s)]: what a cache sample holds.

    The images must share one padded shape: a sample's features then depend on the sample alone (padding
    reaches into the valid region through the receptive field, so mixing shapes would change them).
    """
    shapes = {padded_shape(image.shape[-2], image.shape[-1], teacher.size_divisibility) for image in images}
    assert len(shapes) == 1, f"images of several padded shapes {sorted(shapes)} in one teacher batch"
    features = teacher_features(teacher, images, levels, amp)
    return [
        {
            name: valid_region(features[name][row], teacher.strides[name], image.shape[-2], image.shape[-1])
            for name in levels
        }
        for row, image in enumerate(images)
    ]


def fpn_and_head_weights(teacher: DetectorAdapter) -> dict[str, np.ndarray]:
    """The teacher's FPN + head tensors as numpy, for the cache's teacher_weights blob."""
    return {key: value.detach().cpu().numpy() for key, value in teacher.fpn_and_head_state_dict().items()}


# --- DISTILL.INIT_FROM_TEACHER: what a student takes from its teacher's stored weights ------------
FPN_PREFIX = "backbone.fpn."


@dataclass
class TeacherInit:
    """What DISTILL.INIT_FROM_TEACHER loaded into a student (student key names) and what it left out."""

    teacher_architecture: str
    student_architecture: str
    same_family: bool
    fpn: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)  # teacher head tensors of another family
    skipped_mismatch: list[str] = field(default_factory=list)  # teacher tensors without a same-shaped counterpart

    @property
    def skipped(self) -> list[str]:
        return sorted(self.skipped_head + self.skipped_mismatch)

    def summary(self) -> str:
        """One line, e.g. 'initialised from the RetinaNet teacher: FPN (10 tensors) + head (18 tensors); skipped: ...'."""
        loaded = f"FPN ({len(self.fpn)} tensors)"
        if self.same_family:
            loaded += f" + head ({len(self.head)} tensors)"
        notes = []
        if self.skipped_head:
            notes.append(
                f"the {self.teacher_architecture} head ({len(self.skipped_head)} tensors: not the "
                f"{self.student_architecture} family)"
            )
        if self.skipped_mismatch:
            notes.append(
                f"{len(self.skipped_mismatch)} without a same-shaped counterpart ("
                + ", ".join(self.skipped_mismatch)
                + ")"
            )
        return f"initialised from the {self.teacher_architecture} teacher: {loaded}; skipped: " + (
            "; ".join(notes) if notes else "nothing"
        )


def translate_fpn_key(key: str, teacher_architecture: str, student_architecture: str) -> str | None:
    """A teacher FPN key -> the student's key of the same level (None: the student has no such level).

    torchvision numbers the FPN's lateral (`inner_blocks.i`) and output (`layer_blocks.i`) convs from
    its first level, P3 or P2; the extra levels are named (`extra_blocks.p6`, `.p7`).
    """
    parts = key[len(FPN_PREFIX) :].split(".")
    if parts[0] not in ("inner_blocks", "layer_blocks") or teacher_architecture not in ARCHITECTURES:
        return key
    index = (
        int(parts[1])
        + ARCHITECTURES.get(teacher_architecture).first_level
        - ARCHITECTURES.get(student_architecture).first_level
    )
    if index < 0:
        return None
    return FPN_PREFIX + ".".join([parts[0], str(index), *parts[2:]])


def init_from_teacher(student: DetectorAdapter, state: Mapping[str, Any], teacher_architecture: str) -> TeacherInit:
    """Initialise from a teacher's FPN + head tensors (`fpn_and_head_weights`) what `student` shares with it.

    The FPN always, level by level (a P3-P7 teacher's P3 convs land on a P2-P6 student's P3); the head
    only when both are of one head family (`Architecture.head_family` in detection.modeling.architectures): torchvision's RetinaNet and FCOS
    heads share tensor names and shapes, but one is not an initialisation of the other (docs/METHOD.md,
    section 5). The student's own `load_fpn_and_head` then loads what fits by name and
    shape. An empty `teacher_architecture` (unknown) initialises the FPN only, unmapped.
    """
    student_architecture = student.architecture
    same_family = teacher_architecture in ARCHITECTURES and (
        ARCHITECTURES.get(teacher_architecture).head_family == ARCHITECTURES.get(student_architecture).head_family
    )
    report = TeacherInit(teacher_architecture or "unknown", student_architecture, same_family)
    offered: dict[str, Tensor] = {}  # student key -> teacher tensor
    source: dict[str, str] = {}  # student key -> teacher key
    for key, value in sorted(state.items()):
        if key.startswith(FPN_PREFIX):
            target = translate_fpn_key(key, teacher_architecture, student_architecture) if teacher_architecture else key
        elif same_family:
            target = key
        else:
            report.skipped_head.append(key)
            continue
        if target is None:
            report.skipped_mismatch.append(key)
            continue
        offered[target] = torch.as_tensor(np.asarray(value)) if not isinstance(value, Tensor) else value
        source[target] = key
    not_loaded = set(student.load_fpn_and_head(offered))
    for target, key in source.items():
        if target in not_loaded:
            report.skipped_mismatch.append(key)
        else:
            (report.fpn if key.startswith(FPN_PREFIX) else report.head).append(target)
    report.skipped_mismatch.sort()
    return report
