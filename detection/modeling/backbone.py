"""ResNet + FPN, the backbone every architecture builds on (torchvision's parts, the project's options)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.errors import UserError

DEPTHS = (18, 34, 50, 101)
NORMS = ("BN", "FrozenBN")


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


def backbone_with_fpn(depth: int, norm: str, freeze_at: int, out_channels: int, max_pooled_p6: bool) -> BackboneWithFPN:
    """ResNet-`depth` + FPN: P2-P6 (max-pool P6) from res2-res5 if `max_pooled_p6`, else P3-P7 (P6/P7 from P5)."""
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
    returned = [1, 2, 3, 4] if max_pooled_p6 else [2, 3, 4]
    # Channels of layer1..layer4 outputs: 64..512 for BasicBlock, 256..2048 for Bottleneck.
    stage_channels = {i: (body.inplanes // 8) * 2 ** (i - 1) for i in (1, 2, 3, 4)}
    extra = LastLevelMaxPool() if max_pooled_p6 else LastLevelP6P7(out_channels, out_channels)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(k) for k, i in enumerate(returned)},
        in_channels_list=[stage_channels[i] for i in returned],
        out_channels=out_channels,
        extra_blocks=extra,
    )
