"""Small tensor operations the dense instance-segmentation models (CondInst, SOLOv2) share, and their
common forward (transform, backbone + FPN, then everything after the features).

Written here because torchvision has no dice loss, no integer-factor upsampling that keeps the
"feature pixel i sits on image pixel i * stride" convention of its FCOS anchors, and its GroupNorm
helpers assume 32 groups (the project's tiny test models have 32-channel layers).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from detection.errors import UserError


class ForwardFromFeatures:
    """`forward` = transform -> backbone + FPN -> `forward_from_features`, torchvision-style.

    Split so that a caller holding the FPN features (stage two's student, which distils them) runs the
    rest of the model on them without a second backbone pass. Mixed into nn.Module subclasses that
    define `transform`, `backbone` and `forward_from_features`.
    """

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: the loss dict; eval: per image {boxes, scores, labels, masks [n, 1, h, w] probabilities}."""
        image_list, targets = self.transform(images, targets)
        return self.forward_from_features(image_list, self.backbone(image_list.tensors), targets)


def dice_loss(probs: Tensor, targets: Tensor, eps: float) -> Tensor:
    """Per-instance dice loss 1 - 2|X.Y| / (|X|^2 + |Y|^2 + eps) of [n, ...] probabilities vs {0, 1} targets -> [n].

    `eps` is added once to the denominator (CondInst's form uses 1e-5; SOLOv2's adds 1e-3 to each of
    the two squared sums, i.e. eps = 2e-3).
    """
    x = probs.flatten(1)  # [n, P]
    y = targets.flatten(1).to(x.dtype)  # [n, P]
    intersection = (x * y).sum(1)
    union = (x * x).sum(1) + (y * y).sum(1) + eps
    return 1.0 - 2.0 * intersection / union


def upsample_corner_aligned(x: Tensor, factor: int, centred: bool = False) -> Tensor:
    """[N, C, h, w] -> [N, C, h * factor, w * factor], output pixel j sampling input coordinate j / factor.

    The convention of torchvision's FCOS anchors (and of a ResNet with padded stride-2 convolutions):
    feature pixel i of a stride-s map sits on image pixel i * s. So a stride-8 map upsampled to stride 4
    must put output pixel j on input coordinate j / 2 (bilinear in between, the last row/column held
    beyond the edge), which neither align_corners mode of F.interpolate does for a plain size change.
    `centred`: AdelaiDet's convention (pixel i at i * s + s // 2, its `aligned_bilinear`): the same
    grid moved by factor // 2 output pixels, output pixel j sampling (j - factor // 2) / factor.
    """
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")  # [N, C, h + 1, w + 1]
    grown = F.interpolate(padded, size=(h * factor + 1, w * factor + 1), mode="bilinear", align_corners=True)
    if centred:
        grown = F.pad(grown, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return grown[..., : h * factor, : w * factor]


def group_norm(channels: int, what: str) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or 16 for layers narrower than 64 channels (parameters are the same)."""
    if channels % 16:
        raise UserError(
            f"{what} has {channels} channels; its GroupNorm needs a multiple of 16.",
            "use channel counts that are multiples of 32 (e.g. 32, 64, 128, 256).",
        )
    return nn.GroupNorm(32 if channels >= 64 and channels % 32 == 0 else 16, channels)


def coordinate_channels(n: int, h: int, w: int, like: Tensor) -> Tensor:
    """[n, 2, h, w]: x then y, each spanning -1..1 over the map (SOLO's CoordConv channels)."""
    ys = torch.linspace(-1.0, 1.0, h, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=like.device, dtype=like.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [h, w] each
    return torch.stack([grid_x, grid_y])[None].expand(n, 2, h, w)


def pad_masks(masks: Tensor, padded_hw: tuple[int, int]) -> Tensor:
    """[n, h, w] instance masks of one image -> [n, H, W] zero-padded at the bottom/right like the image."""
    h, w = masks.shape[-2:]
    return F.pad(masks, (0, padded_hw[1] - w, 0, padded_hw[0] - h))


def mask_centroids(masks: Tensor, boxes: Tensor) -> Tensor:
    """[n, h, w] masks -> [n, 2] (x, y) centres of mass in pixel units; an empty mask gives its box centre."""
    m = masks.to(torch.float32)
    h, w = m.shape[-2:]
    mass = m.sum((1, 2))  # [n]
    xs = torch.arange(w, device=m.device, dtype=torch.float32)
    ys = torch.arange(h, device=m.device, dtype=torch.float32)
    cx = (m.sum(1) * xs).sum(1) / mass.clamp(min=1e-6)
    cy = (m.sum(2) * ys).sum(1) / mass.clamp(min=1e-6)
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    centres = torch.stack([cx, cy], 1)
    return torch.where((mass > 0)[:, None], centres, box_centres.to(centres.dtype))


def forward_from_features(
    model: nn.Module,
    image_list: ImageList,
    raw: OrderedDict[str, Tensor],
    targets: list[dict[str, Tensor]] | None,
    training: bool,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """The FORWARD part of the project's own modules: detections come in the sample frame, masks
    [n, 1, h, w], so no torchvision postprocess runs (`training` is the module's own mode)."""
    return model.forward_from_features(image_list, raw, targets)
