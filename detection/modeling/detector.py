"""The detector every stage sees: a torchvision-style model behind one small adapter interface.

Why an adapter: stage one dumps FPN features, stage two distils into FPN features, and both need the
same view of any detector - uniform level names ('p2'..'p7'), their strides, the tensors that fed
the heads, and the detection losses exactly as torchvision computes them. The adapter calls the
model's own parts (transform, backbone, heads, losses, post-processing) in the order the model's own
forward does (each architecture's FORWARD in modeling/meta_arch/), so losses and detections are
torchvision's, with two changes the project needs: no internal resize (images arrive resized by the
augmentation plan) and the FPN feature dict is returned alongside the outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

import detection.modeling.meta_arch  # noqa: F401  (registers every architecture's builder and forward)
from detection import comm
from detection.errors import UserError
from detection.interop import d2_conventions
from detection.modeling.architectures import ARCHITECTURES, BUILD, BUILD_D2, FORWARD, Architecture
from detection.modeling.backbone import backbone_with_fpn


def _build_model(cfg: Any, entry: Architecture, num_classes: int) -> nn.Module:
    """ResNet + FPN, then the entry's builder (detectron2's conventions if MODEL.CONVENTIONS asks), then the
    transform that never resizes."""
    channels = int(cfg.MODEL.FPN.OUT_CHANNELS)
    backbone = backbone_with_fpn(
        int(cfg.MODEL.BACKBONE.DEPTH),
        cfg.MODEL.BACKBONE.NORM,
        int(cfg.MODEL.BACKBONE.FREEZE_AT),
        channels,
        entry.max_pooled_p6,
    )
    d2_conventions.apply_backbone_options(cfg, backbone, entry.name)  # STRIDE_IN_1X1, TOP_BLOCK_IN
    common: dict[str, Any] = dict(
        min_size=1,
        max_size=1,
        image_mean=list(cfg.MODEL.PIXEL_MEAN),
        image_std=list(cfg.MODEL.PIXEL_STD),
        size_divisible=int(cfg.MODEL.SIZE_DIVISIBILITY),
    )
    part = BUILD_D2 if d2_conventions.conventions(cfg) == "detectron2" else BUILD
    model = ARCHITECTURES.part(entry.name, part)(cfg, backbone, num_classes, common)
    model.transform = d2_conventions.presized_transform(cfg, common)  # MODEL.INPUT_FORMAT
    return model


class DetectorAdapter(nn.Module):
    """A torchvision detector that returns (outputs, FPN features, ImageList) with uniform level names.

    `self.model` is the torchvision model itself, so its state dict is torchvision's under a `model.`
    prefix and torchvision checkpoints load with that prefix added (detection.engine.checkpoint does this).
    """

    def __init__(self, model: nn.Module, architecture: str, mask_on: bool) -> None:
        super().__init__()
        self.model = model
        self.architecture = architecture
        self.mask_on = mask_on
        entry = ARCHITECTURES.get(architecture)
        self._forward = ARCHITECTURES.part(architecture, FORWARD)
        self.levels: list[str] = list(entry.levels)
        self.strides: dict[str, int] = entry.strides
        self.out_channels: int = int(model.backbone.out_channels)
        self.size_divisibility: int = int(model.transform.size_divisible)

    # --- the parts every stage uses -------------------------------------------------------------
    def preprocess(self, images: list[Tensor]) -> ImageList:
        """Normalise (MODEL.PIXEL_MEAN/STD, 0-255 units) and zero-pad to SIZE_DIVISIBILITY; never resize."""
        image_list, _ = self.model.transform(images)
        return image_list

    def _named(self, raw: OrderedDict[str, Tensor]) -> dict[str, Tensor]:
        # torchvision orders the FPN outputs from the finest level up; name them by position.
        return dict(zip(self.levels, raw.values()))

    def features(self, batched: Tensor) -> dict[str, Tensor]:
        """Backbone + FPN on an already preprocessed batch (`preprocess(images).tensors`): what stage one dumps."""
        return self._named(self.model.backbone(batched))

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[dict[str, Tensor] | list[dict[str, Tensor]], dict[str, Tensor], ImageList]:
        """Training: (torchvision's loss dict, features, ImageList). Eval: (detections in the sample frame, ...).

        The returned features are the very tensors that fed the heads, so a loss on them trains the model.
        """
        if self.training and targets is None:
            raise ValueError("DetectorAdapter.forward needs targets in training mode.")
        image_list, targets = self.model.transform(images, targets if self.training else None)
        raw = self.model.backbone(image_list.tensors)
        outputs = self._forward(self.model, image_list, raw, targets, self.training)
        return outputs, self._named(raw), image_list

    # --- ICD's "bag of tricks": initialise a student's FPN + head from its teacher ----------------
    def fpn_and_head_state_dict(self) -> dict[str, Tensor]:
        """FPN + detection head weights (everything but the ResNet body), torchvision key names."""
        return {
            key[len("model.") :]: value.detach().clone()
            for key, value in self.state_dict().items()
            if not key.startswith("model.backbone.body.")
        }

    def load_fpn_and_head(self, state: dict[str, Tensor]) -> list[str]:
        """Load every FPN/head tensor whose name and shape match; return the keys that were skipped.

        What a student takes from its teacher (head family, FPN levels) is chosen before this, by
        `cache_contract.teacher.init_from_teacher`.
        """
        own = self.fpn_and_head_state_dict()
        accepted = {
            f"model.{key}": torch.as_tensor(value)
            for key, value in state.items()
            if key in own and tuple(own[key].shape) == tuple(torch.as_tensor(value).shape)
        }
        self.load_state_dict(accepted, strict=False)
        return sorted(key for key in state if f"model.{key}" not in accepted)


def build_detector(cfg: Any, num_classes: int) -> DetectorAdapter:
    """Build MODEL.META_ARCHITECTURE on ResNet-MODEL.BACKBONE.DEPTH + FPN, randomly initialised.

    `num_classes` is K + 1 for K foreground classes (labels 1..K, 0 = background) for every architecture.
    Weights are never downloaded; MODEL.WEIGHTS is loaded by detection.engine.checkpoint.load_weights.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    entry = ARCHITECTURES.get(arch)
    backend = str(cfg.MODEL.BACKEND)
    if backend not in ("torchvision", "detectron2"):
        raise UserError(f"MODEL.BACKEND '{backend}' is not known.", "use torchvision or detectron2.")
    if num_classes < 2:
        raise UserError(
            f"a detector needs at least one foreground class (num_classes = K + 1 = {num_classes}).",
            "check MODEL.NUM_CLASSES or the categories of the training dataset.",
        )
    mask_on = bool(cfg.MODEL.MASK_ON)
    if mask_on and not entry.masks:
        masked = [a.name for a in ARCHITECTURES if a.masks]
        raise UserError(
            f"MODEL.MASK_ON is set but {arch} predicts no masks.",
            f"use one of {', '.join(masked)} or set MODEL.MASK_ON False.",
        )
    if entry.masks and not mask_on:
        raise UserError(
            f"{arch} needs MODEL.MASK_ON True.",
            "set MODEL.MASK_ON True" + (f", or use {entry.boxes_only} for boxes only." if entry.boxes_only else "."),
        )
    if entry.own_module and backend == "detectron2":
        raise UserError(
            f"{arch} is the project's own module: MODEL.BACKEND detectron2 does not apply to it.",
            "set MODEL.BACKEND torchvision (AdelaiDet checkpoints load through MODEL.WEIGHTS).",
        )
    if entry.adelaidet_native and d2_conventions.conventions(cfg) == "detectron2":
        raise UserError(
            f"{arch} already computes AdelaiDet's function: MODEL.CONVENTIONS detectron2 does not apply to it.",
            f"set MODEL.CONVENTIONS torchvision (AdelaiDet {arch} checkpoints load as they are).",
        )
    if backend == "detectron2":
        from detection.interop.d2_backend import build_d2_detector  # imports detectron2; only where asked for

        return build_d2_detector(cfg, num_classes)  # type: ignore[return-value]  (same interface)
    return DetectorAdapter(_build_model(cfg, entry, num_classes), arch, mask_on)


def build_model(cfg: Any, num_classes: int) -> DetectorAdapter:
    """The detector for K = `num_classes` foreground classes, randomly initialised, on this process's device."""
    return build_detector(cfg, num_classes + 1).to(comm.device_for_process(cfg.MODEL.DEVICE))
