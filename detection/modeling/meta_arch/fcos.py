"""FCOS: torchvision's, with `heads.group_norm`'s group count, and its forward from FPN features."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList

from detection.modeling.architectures import ARCHITECTURES, FCOS_ARCH, FORWARD
from detection.modeling.meta_arch.heads import group_norm, test_options
from detection.modeling.meta_arch.retinanet import Outputs, single_stage_forward


def fcos_head(channels: int, num_classes: int) -> FCOSHead:
    """torchvision's FCOS head (GroupNorm after each of its 4 convs), with `group_norm`'s group count."""
    norm = group_norm(channels, FCOS_ARCH.title)
    head = FCOSHead(channels, 1, num_classes)
    head.classification_head = FCOSClassificationHead(channels, 1, num_classes, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(channels, 1, norm_layer=norm)
    return head


@ARCHITECTURES.register(FCOS_ARCH)
def build_fcos(cfg: Any, backbone: nn.Module, num_classes: int, common: dict[str, Any]) -> FCOS:
    head = fcos_head(int(backbone.out_channels), num_classes)
    return FCOS(backbone, num_classes, head=head, **test_options(cfg), **common)


@ARCHITECTURES.register(FCOS_ARCH, FORWARD)
def fcos_forward(
    model: nn.Module,
    image_list: ImageList,
    raw: OrderedDict[str, Tensor],
    targets: list[dict[str, Tensor]] | None,
    training: bool,
) -> Outputs:
    return single_stage_forward(
        model, image_list, raw, targets, training, anchors_per_position=False, loss_needs_counts=True
    )
