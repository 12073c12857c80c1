"""`--online`: the original ICD, with the frozen teacher run live instead of read from the cache.

It exists as the reference for correctness tests and benchmarks, so it produces teacher features
exactly as the cached path delivers them: the teacher sees each image padded only to its own
size-divisible shape (images of equal padded shape share a forward pass, as in stage one), each
image's levels are cut to its valid region ceil(h / stride) x ceil(w / stride), and the batch is
zero-padded to the student's shape by the same `pad_levels` the cached collate uses. With an fp32
cache both paths therefore give the same numbers.

Which teacher: DISTILL.TEACHER.{META_ARCHITECTURE, DEPTH, WEIGHTS}; empty fields fall back to the
teacher identity the cache recorded (architecture, depth, norm, FPN width, weights path), when a cache
is given. Building it never disturbs the global RNG, so the student and ICD modules are initialised
identically in cached and online runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from cache_contract.geometry import batch_padded_shape, pad_levels, padded_shape
from cache_contract.identity import apply_teacher_model_options, file_sha256
from cache_contract.teacher import load_teacher, sample_features
from detection.errors import UserError
from detection.modeling.architectures import ARCHITECTURES
from detection.modeling.detector import DetectorAdapter


def teacher_config(cfg: Any, cache_attributes: Mapping[str, Any] | None = None) -> Any:
    """The student's config with the teacher's architecture, depth, norm, FPN width and weights."""
    recorded = dict((cache_attributes or {}).get("teacher", {}) or {})
    wanted = cfg.DISTILL.TEACHER
    tcfg = cfg.clone()
    tcfg.MODEL.META_ARCHITECTURE = wanted.META_ARCHITECTURE or recorded.get("architecture", "")
    tcfg.MODEL.BACKBONE.DEPTH = int(wanted.DEPTH or recorded.get("depth", 0))
    tcfg.MODEL.WEIGHTS = wanted.WEIGHTS or recorded.get("weights", "")
    if "norm" in recorded:
        tcfg.MODEL.BACKBONE.NORM = recorded["norm"]
    if "fpn_channels" in recorded:
        tcfg.MODEL.FPN.OUT_CHANNELS = int(recorded["fpn_channels"])
    apply_teacher_model_options(tcfg, recorded)  # the teacher's own normalisation / detectron2 options
    arch = tcfg.MODEL.META_ARCHITECTURE
    tcfg.MODEL.MASK_ON = arch in ARCHITECTURES and ARCHITECTURES.get(arch).masks
    missing = [
        key
        for key, value in (
            ("META_ARCHITECTURE", tcfg.MODEL.META_ARCHITECTURE),
            ("DEPTH", tcfg.MODEL.BACKBONE.DEPTH),
            ("WEIGHTS", tcfg.MODEL.WEIGHTS),
        )
        if not value
    ]
    if missing:
        raise UserError(
            f"--online needs the teacher, but DISTILL.TEACHER.{', DISTILL.TEACHER.'.join(missing)} "
            + ("is" if len(missing) == 1 else "are")
            + " empty"
            + (" and the cache does not record it" if recorded else " (and no cache records a teacher)"),
            "set DISTILL.TEACHER.META_ARCHITECTURE, DISTILL.TEACHER.DEPTH and DISTILL.TEACHER.WEIGHTS "
            "(e.g. RetinaNet 101 /path/to/teacher/model_final.pth), or pass the --cache the teacher was dumped to",
        )
    return tcfg


def build_online_teacher(
    cfg: Any, num_classes: int, device: torch.device, cache_attributes: Mapping[str, Any] | None = None
) -> tuple[DetectorAdapter, Any]:
    """(frozen eval-mode teacher on `device`, its config); warns when its weights differ from the cache's."""
    tcfg = teacher_config(cfg, cache_attributes)
    with torch.random.fork_rng(devices=[]):  # the teacher's random init must not shift the student's
        teacher = load_teacher(tcfg, num_classes, device)
    recorded_sha = ((cache_attributes or {}).get("teacher", {}) or {}).get("weights_sha256", "")
    if recorded_sha and file_sha256(tcfg.MODEL.WEIGHTS) != recorded_sha:
        print(
            f"icd distill: warning: the online teacher's weights {tcfg.MODEL.WEIGHTS} are not the ones the "
            "cache was dumped with (sha256 differs); online and cached runs will differ",
            flush=True,
        )
    return teacher, tcfg


class OnlineTeacher:
    """Live teacher features padded like the cached ones: {level: [N, C, H, W]} for a student batch."""

    def __init__(
        self,
        teacher: DetectorAdapter,
        levels: Sequence[str],
        strides: Mapping[str, int],
        student_size_divisibility: int,
        amp: bool = False,
    ) -> None:
        self.teacher = teacher
        self.student_size_divisibility = int(student_size_divisibility)  # the batch's padding grid
        self.levels = list(levels)
        self.strides = {name: int(strides[name]) for name in self.levels}
        self.amp = amp
        self.size_divisibility = int(teacher.size_divisibility)

    def valid_features(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Per image, its levels cut to the valid region [C, ceil(h/s), ceil(w/s)], as stage one stores them.

        Images of equal padded shape share a teacher pass, as in stage one.
        """
        groups: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        for i, image in enumerate(images):
            groups.setdefault(padded_shape(image.shape[-2], image.shape[-1], self.size_divisibility), []).append(i)
        out: list[dict[str, Tensor]] = [{} for _ in images]
        for members in groups.values():
            group = sample_features(self.teacher, [images[i] for i in members], self.levels, self.amp)
            for i, features in zip(members, group):
                out[i] = features
        return out

    def padded(self, images: Sequence[Tensor], padded_hw: tuple[int, int]) -> dict[str, Tensor]:
        """{level: [N, C, H, W]} for a batch padded to `padded_hw`, zeros outside each image's valid region."""
        return pad_levels(self.valid_features(images), padded_hw, self.levels, self.strides)

    def __call__(self, batch: Any, images: Sequence[Tensor]) -> dict[str, Tensor]:
        """The teacher-feature source of an --online run: the student batch's features, padded like the cache's."""
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        return self.padded(images, batch_padded_shape(sizes, self.student_size_divisibility))

    def fpn_and_head_state_dict(self) -> dict[str, Tensor]:
        return self.teacher.fpn_and_head_state_dict()
