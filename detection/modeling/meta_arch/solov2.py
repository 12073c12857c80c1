"""SOLOv2 (Wang et al., NeurIPS 2020): segmenting objects by locations, with dynamic kernels and Matrix NMS.

Laid out as AdelaiDet's SOLOv2 configs the ICD paper used (SOLOv2/Base-SOLOv2.yaml, R50_3x / R101_3x):
ResNet + FPN from res2-res5 (P2-P6, the project's R-CNN FPN) and

- an **instance head** on five levels (P2 pooled to stride 8, P3, P4, P5, P6 resized to P5's size),
  each resized to an S x S grid (S = 40, 36, 24, 16, 12): a category branch (4 conv-GN-ReLU, then a
  conv to K sigmoid scores per cell) and a kernel branch (the same on the features plus two
  normalised coordinate channels, then a conv to E = 256 values per cell: a 1x1 dynamic kernel);
- a unified **mask-feature head**: P2..P5, each brought to stride 4 by conv-GN-ReLU-upsample stages
  (coordinates appended to P5), summed, then a 1x1 conv-GN-ReLU to E channels;
- masks = the kernel of a grid cell convolved with the mask features (dynamic convolution).

Training: a ground-truth instance goes to every level whose scale range holds sqrt(box area)
(ranges (1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)) and, there, to the grid cells of its
centre region: the cells within sigma = 0.2 x half its box around its mask's centre of mass, at most
one cell from the centre's own (``solo_targets``). Losses: sigmoid focal loss on the categories of
every cell (normalised by positive cells + 1) and the dice loss (x 3) of each positive cell's mask
against the instance's mask at stride 4. Inference: point NMS on the category maps, score threshold,
masks of the candidates, area and maskness filters, Matrix NMS (``matrix_nms``, Gaussian decay),
top 100. SOLOv2 predicts no boxes; the detections' ``boxes`` are the boxes of their binary masks so
the project's tooling (which expects boxes) works; evaluate it on segm AP only.

Geometry follows AdelaiDet here: bilinear resampling with align_corners=False (pixel centres), for the
stride-4 ground truth (the same sample points as its OpenCV resize) and for upsampling masks.

State-dict names follow AdelaiDet's so that its checkpoints map by renaming (docs/METHOD.md, section
10): ``ins_head.{cate_tower,kernel_tower}.{j}``, ``ins_head.{cate_pred,kernel_pred}``,
``mask_head.convs_all_levels.{i}.conv{j}.{0,1}``, ``mask_head.conv_pred.{0,1}`` are AdelaiDet's names;
the FPN is torchvision's (``backbone.fpn.*`` for detectron2's ``backbone.fpn_*``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import masks_to_boxes, sigmoid_focal_loss

from detection.errors import UserError
from detection.modeling.architectures import ARCHITECTURES, FORWARD, SOLOV2_ARCH
from detection.modeling.meta_arch.mask_ops import (
    ForwardFromFeatures,
    coordinate_channels,
    dice_loss,
    forward_from_features,
    group_norm,
    mask_centroids,
    pad_masks,
)

# AdelaiDet's defaults (MODEL.SOLOV2.*); the grids and ranges are per instance level (P2..P6).
NUM_GRIDS = (40, 36, 24, 16, 12)
SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
INSTANCE_STRIDES = (8, 8, 16, 32, 32)
MASK_STRIDE = 4
DICE_EPS = 2e-3  # SOLOv2's dice adds 1e-3 to each squared sum


def _conv_gn_relu(in_channels: int, out_channels: int, norm: str, what: str) -> nn.Sequential:
    """3x3 conv (no bias under GroupNorm), GroupNorm, ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm != "GN")]
    if norm == "GN":
        layers.append(group_norm(out_channels, what))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _init_convs(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


class SOLOv2InstanceHead(nn.Module):
    """Five instance levels -> category logits [N, K, S, S] and kernels [N, E, S, S] per level."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_grids: Sequence[int] = NUM_GRIDS,
        channels: int = 512,
        num_convs: int = 4,
        num_kernels: int = 256,
        norm: str = "GN",
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_grids = list(num_grids)
        self.num_classes = num_classes
        self.num_kernels = num_kernels
        self.cate_tower = nn.Sequential(
            *[
                layer
                for i in range(num_convs)
                for layer in _conv_gn_relu(
                    in_channels if i == 0 else channels, channels, norm, "SOLOv2's category branch"
                )
            ]
        )
        self.kernel_tower = nn.Sequential(
            *[
                layer
                for i in range(num_convs)
                for layer in _conv_gn_relu(
                    in_channels + 2 if i == 0 else channels, channels, norm, "SOLOv2's kernel branch"
                )
            ]
        )
        self.cate_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.kernel_pred = nn.Conv2d(channels, num_kernels, 3, padding=1)
        _init_convs([self.cate_tower, self.kernel_tower, self.cate_pred, self.kernel_pred])
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: the five instance levels [N, C, h_l, w_l] -> ([N, K, S_l, S_l], [N, E, S_l, S_l]) per level."""
        cate_preds, kernel_preds = [], []
        for feature, grid in zip(features, self.num_grids):
            n, _, h, w = feature.shape
            x = torch.cat([feature, coordinate_channels(n, h, w, feature)], dim=1)  # [N, C + 2, h, w]
            x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)  # [N, C + 2, S, S]
            kernel_preds.append(self.kernel_pred(self.kernel_tower(x)))
            cate_preds.append(self.cate_pred(self.cate_tower(x[:, :-2])))
        return cate_preds, kernel_preds


class SOLOv2MaskHead(nn.Module):
    """P2..P5 -> unified mask features [N, E, H/4, W/4]: level i goes through i conv-GN-ReLU-upsample(x2)
    stages (one conv without upsampling for P2; coordinates appended to the coarsest), summed, then 1x1."""

    def __init__(
        self, in_channels: int, channels: int = 128, num_masks: int = 256, num_levels: int = 4, norm: str = "GN"
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.convs_all_levels = nn.ModuleList()
        for level in range(num_levels):
            stages = nn.Sequential()
            for j in range(max(level, 1)):
                first = in_channels + (2 if level == num_levels - 1 else 0)
                stages.add_module(
                    f"conv{j}", _conv_gn_relu(first if j == 0 else channels, channels, norm, "SOLOv2's mask branch")
                )
                if level > 0:
                    stages.add_module(f"upsample{j}", nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.convs_all_levels.append(stages)
        pred: list[nn.Module] = [nn.Conv2d(channels, num_masks, 1, bias=norm != "GN")]
        if norm == "GN":
            pred.append(group_norm(num_masks, "SOLOv2's mask features"))
        pred.append(nn.ReLU(inplace=True))
        self.conv_pred = nn.Sequential(*pred)
        _init_convs([self.convs_all_levels, self.conv_pred])

    def forward(self, features: list[Tensor]) -> Tensor:
        """features: P2, P3, P4, P5 ([N, C, H/4, W/4] ... [N, C, H/32, W/32]) -> [N, E, H/4, W/4]."""
        x = self.convs_all_levels[0](features[0])
        for level in range(1, self.num_levels):
            feature = features[level]
            if level == self.num_levels - 1:
                n, _, h, w = feature.shape
                feature = torch.cat([feature, coordinate_channels(n, h, w, feature)], dim=1)  # [N, C + 2, h, w]
            x = x + self.convs_all_levels[level](feature)[..., : x.shape[-2], : x.shape[-1]]
        return self.conv_pred(x)


def solo_targets(
    boxes: Tensor,
    masks: Tensor,
    num_grids: Sequence[int] = NUM_GRIDS,
    scale_ranges: Sequence[Sequence[float]] = SCALE_RANGES,
    sigma: float = 0.2,
) -> list[tuple[Tensor, Tensor]]:
    """Grid assignment of one image's instances, per level: (cell index [m], instance index [m]) pairs.

    boxes [M, 4] xyxy and masks [M, H, W] in the padded image frame (the grid spans the padded image).
    An instance goes to each level whose range holds sqrt(box area) (bounds inclusive) and there to
    the cells of its centre region: around the cell of its mask's centre of mass, the cells within
    sigma x half the box's width/height of that centre, clipped to at most one cell from it. Instances
    with empty masks are skipped. A cell may hold several instances (later ones win its category).
    """
    height, width = masks.shape[-2:]
    centres = mask_centroids(masks, boxes).tolist()  # [M] of (x, y)
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
    valid = (masks.flatten(1).sum(1) > 0).tolist()
    box_list = boxes.tolist()
    out = []
    for grid, (low, high) in zip(num_grids, scale_ranges):
        cells: list[int] = []
        owners: list[int] = []
        for g, ((cx, cy), size, ok, (x1, y1, x2, y2)) in enumerate(zip(centres, sizes, valid, box_list)):
            if not ok or not low <= size <= high:
                continue
            half_w, half_h = 0.5 * (x2 - x1) * sigma, 0.5 * (y2 - y1) * sigma

            def cell(v: float, extent: int) -> int:
                return math.floor(v / extent * grid)

            row, col = cell(cy, height), cell(cx, width)
            top = max(max(0, cell(cy - half_h, height)), row - 1)
            bottom = min(min(grid - 1, cell(cy + half_h, height)), row + 1)
            left = max(max(0, cell(cx - half_w, width)), col - 1)
            right = min(min(grid - 1, cell(cx + half_w, width)), col + 1)
            for i in range(top, bottom + 1):
                for j in range(left, right + 1):
                    cells.append(i * grid + j)
                    owners.append(g)
        out.append(
            (
                torch.tensor(cells, dtype=torch.int64, device=boxes.device),
                torch.tensor(owners, dtype=torch.int64, device=boxes.device),
            )
        )
    return out


def point_nms(heat: Tensor) -> Tensor:
    """[N, K, S, S] scores -> the same with every cell zeroed that is below its up, left or up-left neighbour."""
    peak = F.max_pool2d(heat, kernel_size=2, stride=1, padding=1)[..., :-1, :-1]
    return heat * (peak == heat)


def matrix_nms(
    labels: Tensor,
    masks: Tensor,
    scores: Tensor,
    sigma: float = 2.0,
    kernel: str = "gaussian",
    areas: Tensor | None = None,
) -> Tensor:
    """Matrix NMS (SOLOv2, Sec. 4.2): decayed scores [n] of n masks sorted by decreasing score.

    decay_j = min over higher-scored i of f(iou_ij) / f(comp_i), comp_i = the largest IoU of i with a
    higher-scored mask; IoU counts only within a class; f(x) = exp(-sigma x^2) (gaussian) or 1 - x (linear).
    """
    n = labels.numel()
    if n == 0:
        return scores
    flat = masks.reshape(n, -1).to(scores.dtype)  # [n, P]
    areas = flat.sum(1) if areas is None else areas.to(scores.dtype)
    inter = flat @ flat.T  # [n, n]
    union = areas[:, None] + areas[None, :] - inter
    iou = (inter / union.clamp(min=1e-6)).triu(diagonal=1)  # iou[i, j], i scored above j
    same = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    decay_iou = iou * same  # [n, n]
    compensate = decay_iou.amax(dim=0)  # [n]: comp_i, largest IoU of i with a higher-scored mask
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (decay_iou**2 - compensate[:, None] ** 2))
    elif kernel == "linear":
        ratio = (1 - decay_iou) / (1 - compensate[:, None]).clamp(min=1e-6)
    else:
        raise ValueError(f"unknown Matrix NMS kernel {kernel!r}: use 'gaussian' or 'linear'")
    # column j, rows i >= j hold f(0) / f(comp_i) >= 1 and row 0 holds f(iou_0j) <= 1: the min is over i < j
    return scores * ratio.amin(dim=0)


class SOLOv2(ForwardFromFeatures, nn.Module):
    """SOLOv2 on a P2-P6 FPN backbone (see the module docstring); `num_classes` = K + 1 as every project model.

    The category branch has K sigmoid outputs (class k -> label k + 1); there is no background output.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        num_grids: Sequence[int] = NUM_GRIDS,
        scale_ranges: Sequence[Sequence[float]] = SCALE_RANGES,
        instance_strides: Sequence[int] = INSTANCE_STRIDES,
        sigma: float = 0.2,
        instance_channels: int = 512,
        num_instance_convs: int = 4,
        num_masks: int = 256,
        mask_channels: int = 128,
        norm: str = "GN",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 3.0,
        score_thresh: float = 0.1,
        mask_thresh: float = 0.5,
        update_thresh: float = 0.05,
        nms_pre: int = 500,
        nms_kernel: str = "gaussian",
        nms_sigma: float = 2.0,
        detections_per_img: int = 100,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **transform_kwargs: Any,
    ) -> None:
        super().__init__()
        if not len(num_grids) == len(scale_ranges) == len(instance_strides) == 5:
            raise ValueError("SOLOv2 needs 5 grids, scale ranges and instance strides (P2..P6)")
        self.backbone = backbone
        channels = backbone.out_channels
        self.num_classes = num_classes - 1
        self.num_grids = list(num_grids)
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.instance_strides = list(instance_strides)
        self.sigma = sigma
        self.ins_head = SOLOv2InstanceHead(
            channels, self.num_classes, num_grids, instance_channels, num_instance_convs, num_masks, norm
        )
        self.mask_head = SOLOv2MaskHead(channels, mask_channels, num_masks, num_levels=4, norm=norm)
        self.focal_alpha, self.focal_gamma, self.focal_weight, self.dice_weight = (
            focal_alpha,
            focal_gamma,
            focal_weight,
            dice_weight,
        )
        self.score_thresh, self.mask_thresh, self.update_thresh = score_thresh, mask_thresh, update_thresh
        self.nms_pre, self.nms_kernel, self.nms_sigma = nms_pre, nms_kernel, nms_sigma
        self.detections_per_img = detections_per_img
        self.transform = GeneralizedRCNNTransform(
            min_size,
            max_size,
            image_mean or [0.485, 0.456, 0.406],
            image_std or [0.229, 0.224, 0.225],
            **transform_kwargs,
        )

    def forward_from_features(
        self, image_list: ImageList, features: OrderedDict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Everything after backbone + FPN (features P2..P6 of the padded batch)."""
        p2, p3, p4, p5, p6 = features.values()
        instance_levels = [
            F.interpolate(p2, scale_factor=0.5, mode="bilinear", align_corners=False),
            p3,
            p4,
            p5,
            F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False),
        ]
        cate_preds, kernel_preds = self.ins_head(instance_levels)
        mask_feats = self.mask_head([p2, p3, p4, p5])  # [N, E, H/4, W/4]
        if self.training:
            if targets is None or any("masks" not in t for t in targets):
                raise ValueError("SOLOv2 needs targets with 'masks' in training mode")
            padded_hw = (int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1]))
            return self.compute_losses(targets, cate_preds, kernel_preds, mask_feats, padded_hw)
        return [
            self.detect_single(i, cate_preds, kernel_preds, mask_feats[i], size)
            for i, size in enumerate(image_list.image_sizes)
        ]

    # --- training --------------------------------------------------------------------------------
    def compute_losses(
        self,
        targets: list[dict[str, Tensor]],
        cate_preds: list[Tensor],
        kernel_preds: list[Tensor],
        mask_feats: Tensor,
        padded_hw: tuple[int, int],
    ) -> dict[str, Tensor]:
        """loss_ins (dice of each positive cell's mask, x dice_weight) and loss_cate (focal over all cells)."""
        mask_hw = mask_feats.shape[-2:]
        logits, gts, cate_targets = [], [], []
        num_positive_cells = 0
        for i, target in enumerate(targets):
            padded = pad_masks(target["masks"], padded_hw)  # [M, H, W]
            # stride-4 ground truth: bilinear at the sample points of AdelaiDet's OpenCV resize, then >= 0.5
            small = (
                (
                    F.interpolate(padded[:, None].float(), size=mask_hw, mode="bilinear", align_corners=False)[:, 0]
                    >= 0.5
                ).to(mask_feats.dtype)
                if padded.shape[0]
                else padded.new_zeros((0, *mask_hw), dtype=mask_feats.dtype)
            )
            labels = target["labels"] - 1  # [M] in 0..K-1
            for level, (cells, owners) in enumerate(
                solo_targets(target["boxes"], padded, self.num_grids, self.scale_ranges, self.sigma)
            ):
                grid = self.num_grids[level]
                cate = torch.full((grid * grid,), -1, dtype=torch.int64, device=mask_feats.device)
                if cells.numel():
                    # a cell shared by several instances takes the category of the last one assigned
                    unique, inverse = torch.unique(cells, return_inverse=True)
                    order = torch.arange(cells.numel(), device=cells.device)
                    last = torch.zeros_like(unique).scatter_reduce(0, inverse, order, "amax", include_self=False)
                    cate[unique] = labels[owners[last]]
                    num_positive_cells += int(unique.numel())
                cate_targets.append(cate)
                if cells.numel():
                    kernels = kernel_preds[level][i].flatten(1)[:, cells].T  # [m, E]
                    logits.append(torch.einsum("me,ehw->mhw", kernels, mask_feats[i]))  # [m, H/4, W/4]
                    gts.append(small[owners])
        if logits:
            dice = dice_loss(torch.cat(logits).sigmoid(), torch.cat(gts), DICE_EPS).mean()
        else:  # no instance anywhere: zero, with every parameter still in the graph (DDP)
            dice = mask_feats.sum() * 0 + sum(k.sum() for k in kernel_preds) * 0
        # cells in the order (level, image, row, col), matching cate_targets
        flat_preds = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, self.num_classes) for p in cate_preds])
        per_level = [torch.cat(cate_targets[level :: len(self.num_grids)]) for level in range(len(self.num_grids))]
        flat_targets = torch.cat(per_level)  # [cells]
        one_hot = torch.zeros_like(flat_preds)
        positive = flat_targets >= 0
        one_hot[positive, flat_targets[positive]] = 1.0
        focal = sigmoid_focal_loss(flat_preds, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        return {"loss_ins": dice * self.dice_weight, "loss_cate": focal * self.focal_weight / (num_positive_cells + 1)}

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def detect_single(
        self,
        i: int,
        cate_preds: list[Tensor],
        kernel_preds: list[Tensor],
        mask_feats: Tensor,
        image_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        """One image's instances: {boxes [n, 4], scores [n], labels [n] (1..K), masks [n, 1, h, w] probabilities}."""
        h, w = image_size
        device = mask_feats.device
        scores = torch.cat(
            [point_nms(p[i : i + 1].sigmoid())[0].permute(1, 2, 0).reshape(-1, self.num_classes) for p in cate_preds]
        )  # [cells, K]
        kernels = torch.cat([k[i].permute(1, 2, 0).reshape(-1, k.shape[1]) for k in kernel_preds])  # [cells, E]
        strides = torch.cat(
            [torch.full((g * g,), float(s), device=device) for g, s in zip(self.num_grids, self.instance_strides)]
        )  # [cells]
        cell, cls = torch.nonzero(scores > self.score_thresh, as_tuple=True)
        empty = {
            "boxes": torch.zeros(0, 4, device=device),
            "scores": torch.zeros(0, device=device),
            "labels": torch.zeros(0, dtype=torch.int64, device=device),
            "masks": torch.zeros(0, 1, h, w, device=device),
        }
        if cell.numel() == 0:
            return empty
        probs = torch.einsum("ne,ehw->nhw", kernels[cell], mask_feats).sigmoid()  # [n, H/4, W/4]
        binary = probs > self.mask_thresh
        areas = binary.flatten(1).sum(1).float()
        keep = areas > strides[cell]
        if not keep.any():
            return empty
        probs, binary, areas = probs[keep], binary[keep], areas[keep]
        labels = cls[keep]
        maskness = (probs * binary).flatten(1).sum(1) / areas
        ranked = scores[cell[keep], labels] * maskness
        order = torch.argsort(ranked, descending=True)[: self.nms_pre]
        decayed = matrix_nms(labels[order], binary[order], ranked[order], self.nms_sigma, self.nms_kernel, areas[order])
        kept = decayed >= self.update_thresh
        order, decayed = order[kept], decayed[kept]
        final = torch.argsort(decayed, descending=True)[: self.detections_per_img]
        order, decayed = order[final], decayed[final]
        if order.numel() == 0:
            return empty
        full = F.interpolate(probs[order][None], scale_factor=MASK_STRIDE, mode="bilinear", align_corners=False)
        masks = full[0, :, :h, :w]  # [n, h, w]
        return {
            "boxes": boxes_of_masks(masks > 0.5),
            "scores": decayed,
            "labels": labels[order] + 1,
            "masks": masks[:, None],
        }


def boxes_of_masks(masks: Tensor) -> Tensor:
    """[n, h, w] bool -> [n, 4] xyxy boxes enclosing each mask's pixels (pixel edges); empty masks -> zeros."""
    boxes = torch.zeros(masks.shape[0], 4, device=masks.device)
    filled = masks.flatten(1).any(1)
    if filled.any():
        boxes[filled] = masks_to_boxes(masks[filled]) + torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)
    return boxes


def build_solov2(cfg: Any, backbone: nn.Module, num_classes: int, **kwargs: Any) -> SOLOv2:
    """SOLOv2 from MODEL.SOLOV2.* (score threshold, detections per image and transform arguments passed through)."""
    s = cfg.MODEL.SOLOV2
    grids = [int(g) for g in s.NUM_GRIDS]
    if len(grids) != 5 or min(grids) < 1:
        raise UserError(
            f"MODEL.SOLOV2.NUM_GRIDS {grids} must hold 5 positive grid sizes (P2..P6).",
            "use e.g. [40, 36, 24, 16, 12] (AdelaiDet's).",
        )
    ranges = [list(r) for r in s.SCALE_RANGES]
    if len(ranges) != 5 or any(len(r) != 2 or not 0 <= r[0] <= r[1] for r in ranges):
        raise UserError(
            f"MODEL.SOLOV2.SCALE_RANGES {ranges} must hold 5 [low, high] pairs (sqrt of box area, pixels).",
            "use e.g. [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]] (AdelaiDet's).",
        )
    if s.NORM not in ("GN", ""):
        raise UserError(f"MODEL.SOLOV2.NORM '{s.NORM}' is not supported.", 'use "GN" or "".')
    if s.NMS_KERNEL not in ("gaussian", "linear"):
        raise UserError(f"MODEL.SOLOV2.NMS_KERNEL '{s.NMS_KERNEL}' is not supported.", 'use "gaussian" or "linear".')
    loss = s.LOSS
    return SOLOv2(
        backbone,
        num_classes,
        num_grids=grids,
        scale_ranges=ranges,
        sigma=float(s.SIGMA),
        instance_channels=int(s.INSTANCE_CHANNELS),
        num_instance_convs=int(s.NUM_INSTANCE_CONVS),
        num_masks=int(s.NUM_MASKS),
        mask_channels=int(s.MASK_CHANNELS),
        norm=s.NORM,
        focal_alpha=float(loss.FOCAL_ALPHA),
        focal_gamma=float(loss.FOCAL_GAMMA),
        focal_weight=float(loss.FOCAL_WEIGHT),
        dice_weight=float(loss.DICE_WEIGHT),
        mask_thresh=float(s.MASK_THR),
        update_thresh=float(s.UPDATE_THR),
        nms_pre=int(s.NMS_PRE),
        nms_kernel=s.NMS_KERNEL,
        nms_sigma=float(s.NMS_SIGMA),
        **kwargs,
    )


@ARCHITECTURES.register(SOLOV2_ARCH)
def build(cfg: Any, backbone: nn.Module, num_classes: int, common: dict[str, Any]) -> SOLOv2:
    return build_solov2(
        cfg,
        backbone,
        num_classes,
        score_thresh=float(cfg.MODEL.SCORE_THRESH_TEST),
        detections_per_img=int(cfg.TEST.DETECTIONS_PER_IMAGE),
        **common,
    )


ARCHITECTURES.register(SOLOV2_ARCH, FORWARD)(forward_from_features)
