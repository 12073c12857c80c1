"""Faster and Mask R-CNN: torchvision's, built from the config, and their forward from FPN features."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from detection.modeling.architectures import ARCHITECTURES, FASTER_RCNN_ARCH, FORWARD, MASK_RCNN_ARCH
from detection.modeling.meta_arch.heads import anchor_sizes, test_options
from detection.modeling.meta_arch.retinanet import Outputs


def _rcnn_options(cfg: Any, common: dict[str, Any]) -> dict[str, Any]:
    sizes = tuple((s,) for s in anchor_sizes(cfg))
    rpn_anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    test = test_options(cfg)
    return dict(
        rpn_anchor_generator=rpn_anchors,
        box_score_thresh=test["score_thresh"],
        box_nms_thresh=test["nms_thresh"],
        box_detections_per_img=test["detections_per_img"],
        **common,
    )


@ARCHITECTURES.register(FASTER_RCNN_ARCH)
def build_faster_rcnn(cfg: Any, backbone: nn.Module, num_classes: int, common: dict[str, Any]) -> FasterRCNN:
    return FasterRCNN(backbone, num_classes, **_rcnn_options(cfg, common))


@ARCHITECTURES.register(MASK_RCNN_ARCH)
def build_mask_rcnn(cfg: Any, backbone: nn.Module, num_classes: int, common: dict[str, Any]) -> MaskRCNN:
    # Mask head width follows the FPN width (torchvision's 256 when OUT_CHANNELS is 256);
    # torchvision then wants both predictors given explicitly and num_classes None.
    channels = int(backbone.out_channels)
    return MaskRCNN(
        backbone,
        None,
        box_predictor=FastRCNNPredictor(1024, num_classes),
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
        **_rcnn_options(cfg, common),
    )


@ARCHITECTURES.register(FASTER_RCNN_ARCH, FORWARD)
@ARCHITECTURES.register(MASK_RCNN_ARCH, FORWARD)
def rcnn_forward(
    model: nn.Module,
    image_list: ImageList,
    raw: OrderedDict[str, Tensor],
    targets: list[dict[str, Tensor]] | None,
    training: bool,
) -> Outputs:
    # GeneralizedRCNN.forward minus resize; postprocess only pastes masks (sizes are unchanged).
    proposals, proposal_losses = model.rpn(image_list, raw, targets)
    detections, detector_losses = model.roi_heads(raw, proposals, image_list.image_sizes, targets)
    if training:
        return {**detector_losses, **proposal_losses}
    return model.transform.postprocess(detections, image_list.image_sizes, image_list.image_sizes)
