"""CondInst (Tian, Shen & Chen, ECCV 2020): FCOS plus instance-conditional dynamic mask heads.

Built on torchvision's FCOS, the project's FCOS detector (same points-as-anchors, head, matching rule,
box/centerness/focal losses and post-processing), with the parts CondInst adds, laid out as AdelaiDet's
configs the ICD paper used (CondInst/Base-CondInst.yaml + MS_R_50_1x: FPN P3-P7 from res3-res5,
MAX_PROPOSALS 500, mask branch on P3 from P3-P5, 3-layer 8-channel dynamic heads, mask stride 4):

- **controller**: a 3x3 conv on the FCOS box-tower output predicting, at every location, the
  parameters of a tiny per-instance mask head (169 for 3 layers of 8 channels on 8 + 2 inputs);
- **mask branch**: P3, P4, P5 each refined by conv-norm-ReLU (128 ch), the coarser two upsampled to
  P3 and summed, 4 more conv-norm-ReLU and a 1x1 conv to 8 channels: shared mask features at stride 8;
- **dynamic mask head**: for an instance at location (x, y) of FPN level l, the relative coordinates
  ((x, y) - pixel) / (8 * stride_l) (AdelaiDet's sizes of interest 64..1024) are concatenated in front
  of the mask features and the instance's own 1x1 convs (ReLU between) give one mask logit map, which
  is upsampled to stride 4 (MASK_OUT_STRIDE).

Training: torchvision's FCOS losses, with CondInst's one change to FCOS matching (the centre-sampling
region is centred on the mask's centre of mass), plus ``loss_mask``, the dice loss over the positive
locations (at most MAX_PROPOSALS per batch, drawn at random) against the ground-truth masks sampled at
stride 4. Inference: FCOS detections, then each kept detection's dynamic head gives its mask.

Geometry: torchvision's FCOS anchors put feature pixel i of a stride-s map on image pixel i * s (the
centre of a padded stride-2 ResNet's receptive field). Mask features, relative coordinates, the
stride-4 ground truth (pixels 0, 4, 8, ...) and all upsampling (``upsample_corner_aligned``) follow
that convention, so every position agrees with the points FCOS classifies.

State-dict names follow AdelaiDet's so that its checkpoints map by renaming (docs/METHOD.md,
section 10): ``controller.*`` = ``controller.*``; ``mask_branch.refine.{i}.{0,1}``
and ``mask_branch.tower.{j}`` = the same names; ``head.classification_head.conv.{j}`` =
``proposal_generator.fcos_head.cls_tower.{j}``; ``head.regression_head.conv.{j}`` = ``...bbox_tower.{j}``;
``head.regression_head.bbox_reg`` / ``bbox_ctrness`` / ``head.classification_head.cls_logits`` =
``...bbox_pred`` / ``ctrness`` / ``cls_logits`` (plus a background row 0: torchvision's heads have
K + 1 classes). The dynamic mask head has no parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, clip_boxes_to_image

from detection.errors import UserError
from detection.modeling.architectures import ARCHITECTURES, CONDINST_ARCH, FORWARD
from detection.modeling.meta_arch.fcos import fcos_head
from detection.modeling.meta_arch.heads import test_options
from detection.modeling.meta_arch.mask_ops import (
    ForwardFromFeatures,
    dice_loss,
    forward_from_features,
    group_norm,
    mask_centroids,
    pad_masks,
    upsample_corner_aligned,
)

# CondInst's mask features come from P3, the first level of its P3-P7 FPN.
MASK_FEATURE_STRIDE = 8
# AdelaiDet's FCOS sizes of interest per level (64, 128, ..., 1024) are 8 x the level's stride.
SIZE_OF_INTEREST_PER_STRIDE = 8
DICE_EPS = 1e-5


def _flatten_levels(x: Tensor) -> Tensor:
    """[N, D, H, W] -> [N, H*W, D], positions in the order of torchvision's anchors."""
    return x.flatten(2).transpose(1, 2)


def _conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """3x3 conv (no bias under a norm), norm, ReLU; Kaiming-uniform(a=1) init as AdelaiDet's mask branch."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not norm)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv]
    if norm == "BN":
        layers.append(nn.BatchNorm2d(out_channels))
    elif norm == "GN":
        layers.append(group_norm(out_channels, "the CondInst mask branch"))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class CondInstMaskBranch(nn.Module):
    """P3..P(2+num_levels) -> [N, out_channels, H/8, W/8] mask features shared by all instances."""

    def __init__(
        self,
        in_channels: int,
        channels: int = 128,
        out_channels: int = 8,
        num_convs: int = 4,
        num_levels: int = 3,
        norm: str = "BN",
        centred: bool = False,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.centred = centred  # AdelaiDet's cell-centred grid (upsample_corner_aligned)
        self.out_channels = out_channels
        self.refine = nn.ModuleList(_conv_norm_relu(in_channels, channels, norm) for _ in range(num_levels))
        tower: list[nn.Module] = [_conv_norm_relu(channels, channels, norm) for _ in range(num_convs)]
        tower.append(nn.Conv2d(channels, out_channels, 1))
        self.tower = nn.Sequential(*tower)

    def forward(self, features: list[Tensor]) -> Tensor:
        """features: P3, P4, ... ([N, C, H/8, W/8], [N, C, H/16, W/16], ...) -> [N, out_channels, H/8, W/8]."""
        x = self.refine[0](features[0])  # [N, channels, h3, w3]
        for level in range(1, self.num_levels):
            coarse = self.refine[level](features[level])  # [N, channels, h3 / 2^level, w3 / 2^level]
            up = upsample_corner_aligned(coarse, 2**level, self.centred)
            x = x + up[..., : x.shape[-2], : x.shape[-1]]
        return self.tower(x)


def relative_coordinates(locations: Tensor, scales: Tensor, h: int, w: int, stride: int, offset: float = 0.0) -> Tensor:
    """[n, 2] instance locations (x, y in image pixels), [n] scales -> [n, 2, h, w] (location - pixel) / scale.

    Pixel (i, j) of a stride-`stride` map sits at image position (x, y) = ((j + offset) * stride,
    (i + offset) * stride): offset 0 torchvision's FCOS, 0.5 AdelaiDet's.
    """
    ys = (torch.arange(h, device=locations.device, dtype=locations.dtype) + offset) * stride
    xs = (torch.arange(w, device=locations.device, dtype=locations.dtype) + offset) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [h, w] each
    grid = torch.stack([grid_x, grid_y])  # [2, h, w]
    return (locations[:, :, None, None] - grid[None]) / scales[:, None, None, None]


class DynamicMaskHead(nn.Module):
    """Per-instance 1x1 convs whose weights come from the controller (no parameters of its own).

    Layer l maps `in_l` to `out_l` channels: (in + 2 coords) -> channels -> ... -> channels -> 1. The
    controller's output vector per instance holds all weights first (layer by layer, each [out_l, in_l]
    row-major), then all biases (layer by layer): AdelaiDet's layout, so its controllers map unchanged.
    """

    def __init__(
        self,
        in_channels: int = 8,
        channels: int = 8,
        num_layers: int = 3,
        use_rel_coords: bool = True,
        grid_offset: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError("the dynamic mask head needs at least one layer")
        self.in_channels = in_channels
        self.grid_offset = grid_offset  # where a mask-feature pixel sits in its cell (relative_coordinates)
        self.use_rel_coords = use_rel_coords
        first_in = in_channels + (2 if use_rel_coords else 0)
        widths = [first_in] + [channels] * (num_layers - 1) + [1]
        self.layer_shapes: list[tuple[int, int]] = [(widths[i + 1], widths[i]) for i in range(num_layers)]  # (out, in)
        self.weight_nums = [o * i for o, i in self.layer_shapes]
        self.bias_nums = [o for o, _ in self.layer_shapes]
        self.num_params = sum(self.weight_nums) + sum(self.bias_nums)

    def split_params(self, params: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """[n, num_params] -> (weights [n, out_l, in_l] per layer, biases [n, out_l] per layer)."""
        if params.dim() != 2 or params.shape[1] != self.num_params:
            raise ValueError(f"expected [n, {self.num_params}] mask-head parameters, got {tuple(params.shape)}")
        n = params.shape[0]
        chunks = params.split(self.weight_nums + self.bias_nums, dim=1)
        layers = len(self.layer_shapes)
        weights = [c.reshape(n, o, i) for c, (o, i) in zip(chunks[:layers], self.layer_shapes)]
        biases = [c.reshape(n, o) for c, (o, _) in zip(chunks[layers:], self.layer_shapes)]
        return weights, biases

    def forward(
        self, mask_feats: Tensor, stride: int, params: Tensor, locations: Tensor, scales: Tensor, im_inds: Tensor
    ) -> Tensor:
        """Mask logits [n, 1, h, w] of n instances on their images' mask features [N, C, h, w]."""
        n = params.shape[0]
        h, w = mask_feats.shape[-2:]
        x = mask_feats[im_inds].flatten(2)  # [n, C, h*w]
        if self.use_rel_coords:
            coords = relative_coordinates(locations, scales, h, w, stride, self.grid_offset).to(x.dtype)  # [n, 2, h, w]
            x = torch.cat([coords.flatten(2), x], dim=1)  # [n, C + 2, h*w]
        weights, biases = self.split_params(params)
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(bias[:, :, None], weight, x)  # [n, out_l, h*w]
            if layer < len(weights) - 1:
                x = F.relu(x)
        return x.reshape(n, 1, h, w)


def fcos_matching(anchors: Tensor, num_per_level: list[int], boxes: Tensor, centres: Tensor, radius: float) -> Tensor:
    """torchvision's FCOS assignment with given centres: [A, 4] anchors, [M, 4] boxes, [M, 2] centres -> [A].

    A point is a candidate for a box when it lies inside the box, within `radius` strides of the
    centre (Chebyshev distance), and its largest side distance is in its level's range (stride x 4 ..
    stride x 8; the first level from 0, the last without limit); among candidates the smallest box wins
    (the first on ties). -1: background. With box centres this is torchvision's FCOS.compute_loss rule;
    CondInst passes mask centres of mass.
    """
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    points = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
    size = anchors[:, 2] - anchors[:, 0]  # [A]: the level's stride
    near = (points[:, None, :] - centres[None, :, :]).abs().amax(dim=2) < radius * size[:, None]  # [A, M]
    sides = torch.cat([points[:, None, :] - boxes[None, :, :2], boxes[None, :, 2:] - points[:, None, :]], dim=2)
    lower = size * 4
    lower[: num_per_level[0]] = 0
    upper = size * 8
    upper[-num_per_level[-1] :] = float("inf")
    reach = sides.amax(dim=2)  # [A, M]
    candidate = near & (sides.amin(dim=2) > 0) & (reach > lower[:, None]) & (reach < upper[:, None])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [M]
    cost = torch.where(candidate, areas[None, :].expand_as(candidate), torch.full_like(reach, float("inf")))
    best, matched = cost.min(dim=1)  # [A]
    matched[torch.isinf(best)] = -1
    return matched


class CondInst(ForwardFromFeatures, FCOS):
    """torchvision's FCOS + controller + mask branch + dynamic mask heads (see the module docstring).

    Args (beyond FCOS's): mask_branch_channels / mask_branch_out_channels / mask_branch_convs /
    mask_branch_norm ("BN", "GN" or ""): the mask branch; mask_head_channels / mask_head_layers: the
    dynamic heads; mask_out_stride: stride of the trained masks (divides 8); max_proposals: positive
    locations per batch that train the masks (-1: all).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        mask_branch_channels: int = 128,
        mask_branch_out_channels: int = 8,
        mask_branch_convs: int = 4,
        mask_branch_norm: str = "BN",
        mask_head_channels: int = 8,
        mask_head_layers: int = 3,
        mask_out_stride: int = 4,
        max_proposals: int = 500,
        cell_centred: bool = False,
        **fcos_kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **fcos_kwargs)
        # cell_centred: locations at cell centres (i + 1/2) * stride, AdelaiDet's geometry, for its
        # checkpoints (detection.interop.d2_conventions.AdelaiCondInst, which also brings centred anchors).
        self.cell_centred = cell_centred
        if MASK_FEATURE_STRIDE % mask_out_stride:
            raise ValueError(f"mask_out_stride {mask_out_stride} must divide {MASK_FEATURE_STRIDE}")
        channels = backbone.out_channels
        self.mask_out_stride = mask_out_stride
        self.max_proposals = max_proposals
        self.mask_branch = CondInstMaskBranch(
            channels,
            mask_branch_channels,
            mask_branch_out_channels,
            mask_branch_convs,
            num_levels=3,
            norm=mask_branch_norm,
            centred=cell_centred,
        )
        self.mask_head = DynamicMaskHead(
            mask_branch_out_channels, mask_head_channels, mask_head_layers, grid_offset=0.5 if cell_centred else 0.0
        )
        self.controller = nn.Conv2d(channels, self.mask_head.num_params, 3, padding=1)
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.zeros_(self.controller.bias)

    # --- the whole model, torchvision-style ------------------------------------------------------
    def forward_from_features(
        self, image_list: ImageList, features: OrderedDict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Everything after backbone + FPN (features P3..P7 of the padded batch)."""
        feats = list(features.values())
        head_outputs, params = self.predict(feats)
        anchors = self.anchor_generator(image_list, feats)  # N x [A, 4]
        num_per_level = [f.shape[-2] * f.shape[-1] for f in feats]
        mask_feats = self.mask_branch(feats[: self.mask_branch.num_levels])  # [N, 8, H/8, W/8]
        padded_hw = (int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1]))
        if self.training:
            if targets is None or any("masks" not in t for t in targets):
                raise ValueError("CondInst needs targets with 'masks' in training mode")
            return self.compute_losses(targets, head_outputs, params, anchors, num_per_level, mask_feats, padded_hw)
        return self.detect(head_outputs, params, anchors, num_per_level, mask_feats, image_list.image_sizes)

    def predict(self, feats: list[Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """torchvision's FCOS head outputs ({cls_logits [N, A, K], bbox_regression [N, A, 4], bbox_ctrness
        [N, A, 1]}) and the controller's mask-head parameters [N, A, P], from one pass of the box tower."""
        cls_logits = self.head.classification_head(feats)
        regression = self.head.regression_head
        scales = getattr(regression, "scales", None)  # AdelaiDet's learnt scale per level, where built
        boxes, ctrness, params = [], [], []
        for level, feature in enumerate(feats):
            tower = regression.conv(feature)  # [N, C, H, W]: FCOSRegressionHead's tower, computed once
            reg = regression.bbox_reg(tower)
            boxes.append(_flatten_levels(F.relu(reg * scales[level] if scales is not None else reg)))  # [N, HW, 4]
            ctrness.append(_flatten_levels(regression.bbox_ctrness(tower)))  # [N, HW, 1]
            params.append(_flatten_levels(self.controller(tower)))  # [N, HW, P]
        outputs = {
            "cls_logits": cls_logits,
            "bbox_regression": torch.cat(boxes, 1),
            "bbox_ctrness": torch.cat(ctrness, 1),
        }
        return outputs, torch.cat(params, 1)

    # --- training --------------------------------------------------------------------------------
    def compute_losses(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        params: Tensor,
        anchors: list[Tensor],
        num_per_level: list[int],
        mask_feats: Tensor,
        padded_hw: tuple[int, int],
    ) -> dict[str, Tensor]:
        """torchvision's FCOS losses on CondInst's matching, plus loss_mask (dice)."""
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            centres = (
                mask_centroids(target["masks"], target["boxes"]) if target["boxes"].numel() else target["boxes"][:, :2]
            )
            matched.append(
                fcos_matching(anchors_per_image, num_per_level, target["boxes"], centres, self.center_sampling_radius)
            )
        losses = self.head.compute_loss(targets, head_outputs, anchors, matched)
        losses["loss_mask"] = self.mask_loss(targets, matched, params, torch.stack(anchors), mask_feats, padded_hw)
        return losses

    def mask_loss(
        self,
        targets: list[dict[str, Tensor]],
        matched: list[Tensor],
        params: Tensor,
        anchors: Tensor,
        mask_feats: Tensor,
        padded_hw: tuple[int, int],
    ) -> Tensor:
        """Dice loss of the dynamic masks of (at most max_proposals random) positive locations."""
        im_inds, anchor_inds, gt_inds = [], [], []
        offset = 0
        for i, matched_per_image in enumerate(matched):
            positive = torch.nonzero(matched_per_image >= 0).squeeze(1)
            im_inds.append(torch.full_like(positive, i))
            anchor_inds.append(positive)
            gt_inds.append(matched_per_image[positive] + offset)
            offset += int(targets[i]["boxes"].shape[0])
        im_ind, anchor_ind, gt_ind = torch.cat(im_inds), torch.cat(anchor_inds), torch.cat(gt_inds)
        if 0 <= self.max_proposals < im_ind.numel():
            keep = torch.randperm(im_ind.numel(), device=im_ind.device)[: self.max_proposals]
            im_ind, anchor_ind, gt_ind = im_ind[keep], anchor_ind[keep], gt_ind[keep]
        if im_ind.numel() == 0:  # keep every parameter in the graph (DDP) at zero loss
            return params.sum() * 0 + mask_feats.sum() * 0
        chosen = anchors[im_ind, anchor_ind]  # [n, 4]
        logits = self.mask_head(
            mask_feats,
            MASK_FEATURE_STRIDE,
            params[im_ind, anchor_ind],
            (chosen[:, :2] + chosen[:, 2:]) / 2,
            (chosen[:, 2] - chosen[:, 0]) * SIZE_OF_INTEREST_PER_STRIDE,
            im_ind,
        )  # [n, 1, H/8, W/8]
        logits = upsample_corner_aligned(
            logits, MASK_FEATURE_STRIDE // self.mask_out_stride, self.cell_centred
        )  # [n, 1, H/s, W/s]
        s = self.mask_out_stride
        first = s // 2 if self.cell_centred else 0  # the image pixel of mask pixel 0
        gt = torch.cat([pad_masks(t["masks"], padded_hw)[:, first::s, first::s] for t in targets])[
            gt_ind
        ]  # [n, H/s, W/s]
        return dice_loss(logits.sigmoid(), gt[:, None], DICE_EPS).mean()

    # --- inference -------------------------------------------------------------------------------
    def select_detections(
        self, head_outputs: dict[str, Tensor], anchors: Tensor, num_per_level: list[int], image_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """One image's FCOS detections, torchvision's FCOS.postprocess_detections rule, plus `index`: each
        detection's position in the concatenated anchors (to find its controller output and location)."""
        boxes_all, scores_all, labels_all, index_all = [], [], [], []
        start = 0
        for count in num_per_level:
            logits = head_outputs["cls_logits"][start : start + count]  # [A_l, K]
            num_classes = logits.shape[-1]
            scores = torch.sqrt(
                torch.sigmoid(logits) * torch.sigmoid(head_outputs["bbox_ctrness"][start : start + count])
            )
            scores = scores.flatten()
            candidates = torch.where(scores > self.score_thresh)[0]
            scores, order = scores[candidates].topk(min(self.topk_candidates, candidates.numel()))
            candidates = candidates[order]
            anchor_idx = torch.div(candidates, num_classes, rounding_mode="floor")
            boxes = self.box_coder.decode(
                head_outputs["bbox_regression"][start : start + count][anchor_idx],
                anchors[start : start + count][anchor_idx],
            )
            boxes_all.append(clip_boxes_to_image(boxes, image_size))
            scores_all.append(scores)
            labels_all.append(candidates % num_classes)
            index_all.append(anchor_idx + start)
            start += count
        boxes, scores, labels, index = (torch.cat(x) for x in (boxes_all, scores_all, labels_all, index_all))
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep], "index": index[keep]}

    def detect(
        self,
        head_outputs: dict[str, Tensor],
        params: Tensor,
        anchors: list[Tensor],
        num_per_level: list[int],
        mask_feats: Tensor,
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Per image: FCOS detections with their dynamic masks [n, 1, h, w] (probabilities, image frame)."""
        results = []
        for i, (h, w) in enumerate(image_sizes):
            per_image = {k: v[i] for k, v in head_outputs.items()}
            det = self.select_detections(per_image, anchors[i], num_per_level, (h, w))
            index = det.pop("index")
            chosen = anchors[i][index]  # [n, 4]
            logits = self.mask_head(
                mask_feats,
                MASK_FEATURE_STRIDE,
                params[i][index],
                (chosen[:, :2] + chosen[:, 2:]) / 2,
                (chosen[:, 2] - chosen[:, 0]) * SIZE_OF_INTEREST_PER_STRIDE,
                torch.full_like(index, i),
            )  # [n, 1, H/8, W/8]
            probs = upsample_corner_aligned(
                logits, MASK_FEATURE_STRIDE // self.mask_out_stride, self.cell_centred
            ).sigmoid()
            probs = upsample_corner_aligned(probs, self.mask_out_stride, self.cell_centred)  # [n, 1, H, W]
            det["masks"] = probs[..., :h, :w]
            results.append(det)
        return results


def build_condinst(
    cfg: Any, backbone: nn.Module, num_classes: int, model_class: type[CondInst] | None = None, **fcos_kwargs: Any
) -> CondInst:
    """CondInst from MODEL.CONDINST.* (FCOS arguments - head, thresholds, transform - passed through);
    `model_class`: a CondInst subclass (detection.interop.d2_conventions.AdelaiCondInst for AdelaiDet's conventions)."""
    c = cfg.MODEL.CONDINST
    stride = int(c.MASK_OUT_STRIDE)
    if stride not in (1, 2, 4, 8):
        raise UserError(
            f"MODEL.CONDINST.MASK_OUT_STRIDE {stride} must divide the mask features' stride 8.",
            "use 4 (AdelaiDet's), or 1, 2 or 8.",
        )
    norm = c.MASK_BRANCH.NORM
    if norm not in ("BN", "GN", ""):
        raise UserError(f"MODEL.CONDINST.MASK_BRANCH.NORM '{norm}' is not supported.", 'use "BN", "GN" or "".')
    positive = {
        "MASK_BRANCH.CHANNELS": c.MASK_BRANCH.CHANNELS,
        "MASK_BRANCH.OUT_CHANNELS": c.MASK_BRANCH.OUT_CHANNELS,
        "MASK_HEAD.CHANNELS": c.MASK_HEAD.CHANNELS,
        "MASK_HEAD.NUM_LAYERS": c.MASK_HEAD.NUM_LAYERS,
    }
    for name, value in positive.items():
        if int(value) < 1:
            raise UserError(f"MODEL.CONDINST.{name} {value} must be positive.", "use AdelaiDet's value (see defaults).")
    if int(c.MAX_PROPOSALS) < -1 or int(c.MAX_PROPOSALS) == 0:
        raise UserError(
            f"MODEL.CONDINST.MAX_PROPOSALS {c.MAX_PROPOSALS} must be positive, or -1 for all.",
            "use 500 (AdelaiDet's), or -1.",
        )
    return (model_class or CondInst)(
        backbone,
        num_classes,
        mask_branch_channels=int(c.MASK_BRANCH.CHANNELS),
        mask_branch_out_channels=int(c.MASK_BRANCH.OUT_CHANNELS),
        mask_branch_convs=int(c.MASK_BRANCH.NUM_CONVS),
        mask_branch_norm=norm,
        mask_head_channels=int(c.MASK_HEAD.CHANNELS),
        mask_head_layers=int(c.MASK_HEAD.NUM_LAYERS),
        mask_out_stride=stride,
        max_proposals=int(c.MAX_PROPOSALS),
        **fcos_kwargs,
    )


@ARCHITECTURES.register(CONDINST_ARCH)
def build(cfg: Any, backbone: nn.Module, num_classes: int, common: dict[str, Any]) -> CondInst:
    """torchvision's FCOS head and thresholds, CondInst's mask branch and dynamic heads."""
    head = fcos_head(int(backbone.out_channels), num_classes)
    return build_condinst(cfg, backbone, num_classes, head=head, **test_options(cfg), **common)


ARCHITECTURES.register(CONDINST_ARCH, FORWARD)(forward_from_features)
