"""RetinaNet: torchvision's, built from the config, and its forward from FPN features (no resize)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead

from detection.errors import UserError
from detection.modeling.architectures import ARCHITECTURES, FORWARD, RETINANET_ARCH
from detection.modeling.meta_arch.heads import anchor_sizes, group_norm, test_options

Outputs = dict[str, Tensor] | list[dict[str, Tensor]]


def retinanet_head(cfg: Any, channels: int, num_anchors: int, num_classes: int) -> RetinaNetHead:
    """torchvision's RetinaNet head: plain (v1) or with GroupNorm (v2) per MODEL.RETINANET.NORM."""
    norm = cfg.MODEL.RETINANET.NORM
    if norm not in ("", "GN"):
        raise UserError(f"MODEL.RETINANET.NORM '{norm}' is not supported.", 'use "" (no norm) or "GN".')
    layer = group_norm(channels, "RetinaNet with NORM GN") if norm == "GN" else None
    return RetinaNetHead(channels, num_anchors, num_classes, norm_layer=layer)


@ARCHITECTURES.register(RETINANET_ARCH)
def build_retinanet(cfg: Any, backbone: nn.Module, num_classes: int, common: dict[str, Any]) -> RetinaNet:
    # torchvision's RetinaNet anchors: 3 octave scales x 3 aspect ratios per level.
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in anchor_sizes(cfg))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = retinanet_head(cfg, int(backbone.out_channels), anchors.num_anchors_per_location()[0], num_classes)
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **test_options(cfg), **common)


def single_stage_forward(
    model: nn.Module,
    image_list: ImageList,
    raw: OrderedDict[str, Tensor],
    targets: list[dict[str, Tensor]] | None,
    training: bool,
    anchors_per_position: bool,
    loss_needs_counts: bool,
) -> Outputs:
    """RetinaNet.forward / FCOS.forward minus resize, from the model's own parts.

    `anchors_per_position`: the head predicts several anchors per position (split the outputs by
    anchors, not positions); `loss_needs_counts`: compute_loss takes the positions per level (FCOS).
    """
    features = list(raw.values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    num_per_level = [f.size(2) * f.size(3) for f in features]
    if training:
        if loss_needs_counts:
            return model.compute_loss(targets, head_outputs, anchors, num_per_level)
        return model.compute_loss(targets, head_outputs, anchors)
    if anchors_per_position:
        per_position = head_outputs["cls_logits"].size(1) // sum(num_per_level)
        num_per_level = [n * per_position for n in num_per_level]
    split_outputs = {k: list(v.split(num_per_level, dim=1)) for k, v in head_outputs.items()}
    split_anchors = [list(a.split(num_per_level)) for a in anchors]
    detections = model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
    return model.transform.postprocess(detections, image_list.image_sizes, image_list.image_sizes)


@ARCHITECTURES.register(RETINANET_ARCH, FORWARD)
def retinanet_forward(
    model: nn.Module,
    image_list: ImageList,
    raw: OrderedDict[str, Tensor],
    targets: list[dict[str, Tensor]] | None,
    training: bool,
) -> Outputs:
    return single_stage_forward(
        model, image_list, raw, targets, training, anchors_per_position=True, loss_needs_counts=False
    )
