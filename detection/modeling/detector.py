"""The detector zoo: torchvision detectors behind one small adapter interface.

Why an adapter: stage one dumps FPN features, stage two distils into FPN features, and both need the
same view of any detector - uniform level names ('p2'..'p7'), their strides, the tensors that fed
the heads, and the detection losses exactly as torchvision computes them. The adapter calls the
torchvision model's own parts (transform, backbone, heads, losses, post-processing) in the order the
model's own forward does, so losses and detections are torchvision's, with two changes the project
needs: no internal resize (images arrive resized by the augmentation plan) and the FPN feature dict
is returned alongside the outputs.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.interop import d2_conventions as d2_arch
from detection import comm
from detection.modeling.meta_arch.condinst import build_condinst
from detection.errors import UserError
from detection.modeling.meta_arch.solov2 import build_solov2

SINGLE_STAGE = ("RetinaNet", "FCOS")
TWO_STAGE = ("FasterRCNN", "MaskRCNN")
# Dense instance segmentation (detection/modeling/meta_arch/condinst.py, detection/modeling/meta_arch/solov2.py): their own heads on this FPN.
DENSE_INSTANCE = ("CondInst", "SOLOv2")
ARCHITECTURES = SINGLE_STAGE + TWO_STAGE + DENSE_INSTANCE
# Architectures on the P2-P6 FPN from res2-res5 (max-pooled P6); the others use P3-P7 from res3-res5.
P2_P6 = TWO_STAGE + ("SOLOv2",)
# Architectures that predict instance masks (MODEL.MASK_ON must be True) and boxes (box AP is evaluated).
MASK_ARCHITECTURES = ("MaskRCNN", "CondInst", "SOLOv2")
BOX_ARCHITECTURES = SINGLE_STAGE + TWO_STAGE + ("CondInst",)
# Detection-head lineages: DISTILL.INIT_FROM_TEACHER (cache_contract.teacher.init_from_teacher) copies a
# teacher's head only into a student of the same family (CondInst's detector is FCOS's head, Mask R-CNN's
# box branch is Faster R-CNN's); across families it copies the FPN alone.
HEAD_FAMILIES = {"RetinaNet": "RetinaNet", "FCOS": "FCOS", "CondInst": "FCOS", "FasterRCNN": "R-CNN",
                 "MaskRCNN": "R-CNN", "SOLOv2": "SOLOv2"}
DEPTHS = (18, 34, 50, 101)
NORMS = ("BN", "FrozenBN")

# Stride of every FPN level name the project uses.
LEVEL_STRIDES: dict[str, int] = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
# torchvision's default anchor base sizes, one per level (used when MODEL.ANCHOR_GENERATOR.SIZES is empty).
DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)


def default_distill_levels(architecture: str) -> list[str]:
    """The FPN levels ICD distils, all of the architecture's FPN: P3-P7 for RetinaNet, FCOS and CondInst
    (the authors' default), P2-P6 for the R-CNNs (their R-CNN configs) and SOLOv2 (its FPN has no P7)
    (docs/METHOD.md, sections 1 and 10)."""
    _check_architecture(architecture)
    if architecture in P2_P6:
        return ["p2", "p3", "p4", "p5", "p6"]
    return ["p3", "p4", "p5", "p6", "p7"]


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise UserError(
            f"MODEL.META_ARCHITECTURE '{architecture}' is not a known detector.",
            f"use one of: {', '.join(ARCHITECTURES)}.",
        )


def _norm_layer(norm: str) -> Callable[..., nn.Module]:
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    raise UserError(f"MODEL.BACKBONE.NORM '{norm}' is not supported.", f"use one of: {', '.join(NORMS)}.")


def _freeze_stages(body: nn.Module, freeze_at: int) -> None:
    """Freeze the first `freeze_at` ResNet stages (stem = 1, layer1 = 2, ...), like detectron2's FREEZE_AT.

    Written here rather than taken from torchvision's `_resnet_fpn_extractor` because that helper
    hard-codes 256 FPN channels, and FPN.OUT_CHANNELS must be configurable.
    """
    stages = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    frozen = tuple(prefix for stage in stages[:freeze_at] for prefix in stage)
    for name, parameter in body.named_parameters():
        if name.startswith(frozen):
            parameter.requires_grad_(False)


def _backbone_with_fpn(
    depth: int, norm: str, freeze_at: int, out_channels: int, two_stage: bool
) -> BackboneWithFPN:
    """ResNet-`depth` + FPN: P3-P7 (P6/P7 from P5) for single-stage, P2-P6 (max-pool P6) for R-CNN."""
    if depth not in DEPTHS:
        raise UserError(
            f"MODEL.BACKBONE.DEPTH {depth} is not supported.", f"use one of: {', '.join(map(str, DEPTHS))}."
        )
    if not 0 <= freeze_at <= 5:
        raise UserError(f"MODEL.BACKBONE.FREEZE_AT {freeze_at} is out of range.", "use 0 (none) to 5 (all stages).")
    if out_channels < 1:
        raise UserError(f"MODEL.FPN.OUT_CHANNELS {out_channels} must be positive.", "use e.g. 256.")
    body = getattr(resnet, f"resnet{depth}")(weights=None, norm_layer=_norm_layer(norm))
    _freeze_stages(body, freeze_at)
    returned = [1, 2, 3, 4] if two_stage else [2, 3, 4]
    # Channels of layer1..layer4 outputs: 64..512 for BasicBlock, 256..2048 for Bottleneck.
    stage_channels = {i: (body.inplanes // 8) * 2 ** (i - 1) for i in (1, 2, 3, 4)}
    extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(out_channels, out_channels)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(k) for k, i in enumerate(returned)},
        in_channels_list=[stage_channels[i] for i in returned],
        out_channels=out_channels,
        extra_blocks=extra,
    )


def _anchor_sizes(cfg: Any) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in (cfg.MODEL.ANCHOR_GENERATOR.SIZES or DEFAULT_ANCHOR_SIZES))
    if len(sizes) != 5 or any(s <= 0 for s in sizes):
        raise UserError(
            f"MODEL.ANCHOR_GENERATOR.SIZES {list(sizes)} must hold 5 positive base sizes, one per FPN level.",
            "use e.g. [32, 64, 128, 256, 512] (or [] for torchvision's default).",
        )
    return sizes


def _group_norm(channels: int, what: str) -> Callable[[int], nn.Module]:
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


def _fcos_head(channels: int, num_classes: int) -> FCOSHead:
    """torchvision's FCOS head (GroupNorm after each of its 4 convs), with `_group_norm`'s group count."""
    norm = _group_norm(channels, "FCOS")
    head = FCOSHead(channels, 1, num_classes)
    head.classification_head = FCOSClassificationHead(channels, 1, num_classes, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(channels, 1, norm_layer=norm)
    return head


def _retinanet_head(cfg: Any, channels: int, num_anchors: int, num_classes: int) -> RetinaNetHead:
    """torchvision's RetinaNet head: plain (v1) or with GroupNorm (v2) per MODEL.RETINANET.NORM."""
    norm = cfg.MODEL.RETINANET.NORM
    if norm not in ("", "GN"):
        raise UserError(f"MODEL.RETINANET.NORM '{norm}' is not supported.", 'use "" (no norm) or "GN".')
    layer = _group_norm(channels, "RetinaNet with NORM GN") if norm == "GN" else None
    return RetinaNetHead(channels, num_anchors, num_classes, norm_layer=layer)


def _build_torchvision_model(cfg: Any, num_classes: int) -> nn.Module:
    arch = cfg.MODEL.META_ARCHITECTURE
    two_stage = arch in P2_P6
    channels = int(cfg.MODEL.FPN.OUT_CHANNELS)
    backbone = _backbone_with_fpn(
        int(cfg.MODEL.BACKBONE.DEPTH), cfg.MODEL.BACKBONE.NORM, int(cfg.MODEL.BACKBONE.FREEZE_AT), channels, two_stage
    )
    d2_arch.apply_backbone_options(cfg, backbone, arch)  # STRIDE_IN_1X1, TOP_BLOCK_IN
    common: dict[str, Any] = dict(
        min_size=1, max_size=1, image_mean=list(cfg.MODEL.PIXEL_MEAN), image_std=list(cfg.MODEL.PIXEL_STD),
        size_divisible=int(cfg.MODEL.SIZE_DIVISIBILITY),
    )
    if d2_arch.conventions(cfg) == "detectron2":
        model = d2_arch.build_detectron2_style(cfg, num_classes, backbone, common, _retinanet_head, _fcos_head,
                                               _anchor_sizes(cfg))
        model.transform = d2_arch.presized_transform(cfg, common)
        return model
    score, nms, per_image = float(cfg.MODEL.SCORE_THRESH_TEST), float(cfg.MODEL.NMS_THRESH_TEST), int(
        cfg.TEST.DETECTIONS_PER_IMAGE
    )
    if arch == "RetinaNet":
        # torchvision's RetinaNet anchors: 3 octave scales x 3 aspect ratios per level.
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in _anchor_sizes(cfg))
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        head = _retinanet_head(cfg, channels, anchors.num_anchors_per_location()[0], num_classes)
        model = RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, score_thresh=score,
                          nms_thresh=nms, detections_per_img=per_image, **common)
    elif arch == "FCOS":
        model = FCOS(backbone, num_classes, head=_fcos_head(channels, num_classes), score_thresh=score,
                     nms_thresh=nms, detections_per_img=per_image, **common)
    elif arch == "CondInst":
        model = build_condinst(cfg, backbone, num_classes, head=_fcos_head(channels, num_classes), score_thresh=score,
                               nms_thresh=nms, detections_per_img=per_image, **common)
    elif arch == "SOLOv2":
        model = build_solov2(cfg, backbone, num_classes, score_thresh=score, detections_per_img=per_image, **common)
    else:
        sizes = tuple((s,) for s in _anchor_sizes(cfg))
        rpn_anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        rcnn: dict[str, Any] = dict(rpn_anchor_generator=rpn_anchors, box_score_thresh=score, box_nms_thresh=nms,
                                    box_detections_per_img=per_image, **common)
        if arch == "FasterRCNN":
            model = FasterRCNN(backbone, num_classes, **rcnn)
        else:
            # Mask head width follows the FPN width (torchvision's 256 when OUT_CHANNELS is 256);
            # torchvision then wants both predictors given explicitly and num_classes None.
            model = MaskRCNN(backbone, None, box_predictor=FastRCNNPredictor(1024, num_classes),
                             mask_head=MaskRCNNHeads(channels, [channels] * 4, 1),
                             mask_predictor=MaskRCNNPredictor(channels, channels, num_classes), **rcnn)
    model.transform = d2_arch.presized_transform(cfg, common)  # MODEL.INPUT_FORMAT
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
        self.levels: list[str] = default_distill_levels(architecture)
        self.strides: dict[str, int] = {name: LEVEL_STRIDES[name] for name in self.levels}
        self.out_channels: int = int(model.backbone.out_channels)
        self.size_divisibility: int = int(model.transform.size_divisible)

    # --- the parts every stage uses -------------------------------------------------------------
    def preprocess(self, images: list[Tensor]) -> ImageList:
        """Normalise (MODEL.PIXEL_MEAN/STD, 0-255 units) and zero-pad to SIZE_DIVISIBILITY; never resize."""
        image_list, _ = self.model.transform(images)
        return image_list

    def _named(self, raw: "OrderedDict[str, Tensor]") -> dict[str, Tensor]:
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
        if self.architecture in SINGLE_STAGE:
            outputs = self._single_stage(image_list, raw, targets)
        elif self.architecture in DENSE_INSTANCE:
            # detections are already in the sample frame, masks [n, 1, h, w]: no torchvision postprocess
            outputs = self.model.forward_from_features(image_list, raw, targets)
        else:
            outputs = self._two_stage(image_list, raw, targets)
        return outputs, self._named(raw), image_list

    def _single_stage(
        self, image_list: ImageList, raw: "OrderedDict[str, Tensor]", targets: list[dict[str, Tensor]] | None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        # RetinaNet.forward / FCOS.forward, minus resize, built from the model's own parts.
        model = self.model
        features = list(raw.values())
        head_outputs = model.head(features)
        anchors = model.anchor_generator(image_list, features)
        num_per_level = [f.size(2) * f.size(3) for f in features]
        if self.training:
            if self.architecture == "FCOS":
                return model.compute_loss(targets, head_outputs, anchors, num_per_level)
            return model.compute_loss(targets, head_outputs, anchors)
        if self.architecture == "RetinaNet":
            anchors_per_position = head_outputs["cls_logits"].size(1) // sum(num_per_level)
            num_per_level = [n * anchors_per_position for n in num_per_level]
        split_outputs = {k: list(v.split(num_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(num_per_level)) for a in anchors]
        detections = model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
        return model.transform.postprocess(detections, image_list.image_sizes, image_list.image_sizes)

    def _two_stage(
        self, image_list: ImageList, raw: "OrderedDict[str, Tensor]", targets: list[dict[str, Tensor]] | None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        # GeneralizedRCNN.forward minus resize; postprocess only pastes masks (sizes are unchanged).
        model = self.model
        proposals, proposal_losses = model.rpn(image_list, raw, targets)
        detections, detector_losses = model.roi_heads(raw, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**detector_losses, **proposal_losses}
        return model.transform.postprocess(detections, image_list.image_sizes, image_list.image_sizes)

    # --- ICD's "bag of tricks": initialise a student's FPN + head from its teacher ----------------
    def fpn_and_head_state_dict(self) -> dict[str, Tensor]:
        """FPN + detection head weights (everything but the ResNet body), torchvision key names."""
        return {
            key[len("model."):]: value.detach().clone()
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
    Weights are never downloaded; MODEL.WEIGHTS is loaded by detection.checkpoint.load_weights.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    _check_architecture(arch)
    backend = str(cfg.MODEL.BACKEND)
    if backend not in ("torchvision", "detectron2"):
        raise UserError(f"MODEL.BACKEND '{backend}' is not known.", "use torchvision or detectron2.")
    if num_classes < 2:
        raise UserError(
            f"a detector needs at least one foreground class (num_classes = K + 1 = {num_classes}).",
            "check MODEL.NUM_CLASSES or the categories of the training dataset.",
        )
    mask_on = bool(cfg.MODEL.MASK_ON)
    if mask_on and arch not in MASK_ARCHITECTURES:
        raise UserError(f"MODEL.MASK_ON is set but {arch} predicts no masks.",
                        f"use one of {', '.join(MASK_ARCHITECTURES)} or set MODEL.MASK_ON False.")
    if arch in MASK_ARCHITECTURES and not mask_on:
        boxes_only = {"MaskRCNN": "FasterRCNN", "CondInst": "FCOS"}.get(arch)
        raise UserError(f"{arch} needs MODEL.MASK_ON True.", "set MODEL.MASK_ON True"
                        + (f", or use {boxes_only} for boxes only." if boxes_only else "."))
    if arch in DENSE_INSTANCE and backend == "detectron2":
        raise UserError(f"{arch} is the project's own module: MODEL.BACKEND detectron2 does not apply to it.",
                        "set MODEL.BACKEND torchvision (AdelaiDet checkpoints load through MODEL.WEIGHTS).")
    if arch == "SOLOv2" and d2_arch.conventions(cfg) == "detectron2":
        raise UserError("SOLOv2 already computes AdelaiDet's function: MODEL.CONVENTIONS detectron2 does not apply to it.",
                        "set MODEL.CONVENTIONS torchvision (AdelaiDet SOLOv2 checkpoints load as they are).")
    if backend == "detectron2":
        from detection.interop.d2_backend import build_d2_detector  # imports detectron2; only where asked for

        return build_d2_detector(cfg, num_classes)  # type: ignore[return-value]  (same interface)
    return DetectorAdapter(_build_torchvision_model(cfg, num_classes), arch, mask_on)


def build_model(cfg: Any, num_classes: int) -> DetectorAdapter:
    """The detector for K = `num_classes` foreground classes, randomly initialised, on this process's device."""
    return build_detector(cfg, num_classes + 1).to(comm.device_for_process(cfg.MODEL.DEVICE))
