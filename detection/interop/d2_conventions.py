"""detectron2-compatible architecture options for the torchvision backend.

A detectron2 (or AdelaiDet) checkpoint only means something inside the function it was trained as.
torchvision's detectors differ from detectron2's in details that change the outputs, not the weights'
shapes, so converted weights alone would load "fine" and compute something else. These options
rebuild the torchvision model so that it computes detectron2's function (docs/D2_INTEROP.md,
section "What differs and what the options change"):

- `MODEL.INPUT_FORMAT BGR`: images arrive RGB (the project's contract); BGR models see them flipped
  before MODEL.PIXEL_MEAN/STD (given in the model's channel order, as detectron2's are).
- `MODEL.RESNETS.STRIDE_IN_1X1`: MSRA ResNets stride in the first 1x1 conv of a bottleneck,
  torchvision's in the 3x3.
- `MODEL.FPN.TOP_BLOCK_IN res5 | p5`: detectron2's RetinaNet computes P6 from C5, AdelaiDet's FCOS
  and torchvision from P5.
- `MODEL.CONVENTIONS detectron2`: everything else that differs -
  * anchors: exact (unrounded) cell anchors in detectron2's order (size-major, then aspect ratio),
    the true level stride, MODEL.ANCHOR_GENERATOR.OFFSET (torchvision rounds the cell anchors, orders
    them ratio-major and derives the stride from the padded image size by integer division);
  * RoI pooling: ROIAlignV2 (aligned=True, adaptive sampling) with detectron2's level mapper
    floor(4 + log2(sqrt(area) / 224 + 1e-8)) (torchvision: aligned=False, 2 samples, eps outside the log);
  * RPN proposals: NMS on logits, empty boxes dropped (torchvision: on sigmoids, boxes < 1e-3 dropped),
    detectron2's train-time top-k (2000 / 1000);
  * post-processing: RetinaNet boxes clipped after NMS; Fast R-CNN boxes not filtered by size; every
    detector's boxes clipped and empty ones dropped at the end; masks pasted as detectron2 pastes
    them (grid_sample on the box), as in detectron2's `detector_postprocess`;
  * FCOS as AdelaiDet builds it: locations at the centre of each stride cell, a learnt scale per level
    on the box regression, candidates thresholded on the class score before the centre-ness product,
    class-wise NMS at MODEL.NMS_THRESH_TEST and the top DETECTIONS_PER_IMAGE kept by score.
  * CondInst as AdelaiDet builds it: that FCOS (candidates thresholded after the centre-ness product,
    its Base-CondInst setting), and mask features, relative coordinates and mask upsampling on the
    cell-centred grid (AdelaiDet's aligned_bilinear), masks in the image frame.
  * FrozenBN evaluated with the fused batch-norm op without autograd, as detectron2 does (the same
    function, other rounding);
What does not differ, checked against detectron2's source: the stem and blocks,
FPN lateral/output convs with "sum" fusion and nearest x2 upsampling, max-pool P6 for R-CNNs, the
box coder (RPN and RetinaNet weights 1,1,1,1; Fast R-CNN 10,10,5,5; clamp log(1000/16)), the
RetinaNet/RPN head layouts ([A, K] per location), zero padding after normalisation. Training losses
(smooth L1 vs L1 vs GIoU, sampling) do not change inference and are left as torchvision computes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.resnet import Bottleneck
from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image, roi_align
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from detection.errors import UserError
from detection.modeling.architectures import (
    ARCHITECTURES,
    BUILD_D2,
    CONDINST_ARCH,
    FASTER_RCNN_ARCH,
    FCOS_ARCH,
    MASK_RCNN_ARCH,
    RETINANET_ARCH,
)
from detection.modeling.meta_arch.condinst import CondInst, build_condinst
from detection.modeling.meta_arch.fcos import fcos_head
from detection.modeling.meta_arch.heads import anchor_sizes, test_options
from detection.modeling.meta_arch.retinanet import retinanet_head
from detection.modeling.transform import PresizedTransform

CONVENTIONS = ("torchvision", "detectron2")
INPUT_FORMATS = ("RGB", "BGR")
TOP_BLOCK_INPUTS = ("", "p5", "res5")
# detectron2's Base-RCNN-FPN RPN settings (per level before NMS / per image after), train and test.
D2_RPN_TOPK = {"pre_train": 2000, "pre_test": 1000, "post_train": 1000, "post_test": 1000}


# --- the options, validated -------------------------------------------------------------------
def conventions(cfg: Any) -> str:
    value = str(cfg.MODEL.CONVENTIONS)
    if value not in CONVENTIONS:
        raise UserError(f"MODEL.CONVENTIONS '{value}' is not known.", f"use one of: {', '.join(CONVENTIONS)}.")
    return value


def input_format(cfg: Any) -> str:
    value = str(cfg.MODEL.INPUT_FORMAT)
    if value not in INPUT_FORMATS:
        raise UserError(f"MODEL.INPUT_FORMAT '{value}' is not known.", "use RGB or BGR (detectron2's MSRA models).")
    return value


def top_block_input(cfg: Any, architecture: str) -> str:
    """Where P6 comes from: 'p5' or 'res5' (P3-P7 architectures); '' for R-CNNs and SOLOv2 (max-pooled P5,
    not configurable)."""
    value = str(cfg.MODEL.FPN.TOP_BLOCK_IN)
    if value not in TOP_BLOCK_INPUTS:
        raise UserError(
            f"MODEL.FPN.TOP_BLOCK_IN '{value}' is not known.",
            'use p5, res5, or "" (res5 for detectron2\'s RetinaNet, p5 otherwise).',
        )
    entry = ARCHITECTURES.get(architecture)
    if entry.max_pooled_p6:
        if value == "res5":
            raise UserError(
                f"MODEL.FPN.TOP_BLOCK_IN res5 does not apply to {architecture}: its P6 is P5 max-pooled.",
                "leave MODEL.FPN.TOP_BLOCK_IN empty for R-CNNs and SOLOv2.",
            )
        return ""
    if value:
        return value
    return entry.d2_top_block_in if conventions(cfg) == "detectron2" else "p5"


def describe(cfg: Any) -> dict[str, Any]:
    """The options as recorded with a model (loading messages, the cache's teacher identity)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    p6p7 = top_block_input(cfg, arch)  # "" for the P2-P6 architectures (max-pooled P6)
    return {
        "conventions": conventions(cfg),
        "input_format": input_format(cfg),
        "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
        "stride_in_1x1": bool(cfg.MODEL.RESNETS.STRIDE_IN_1X1),
        "top_block_in": p6p7 or "p5-maxpool",
    }


# --- backbone ---------------------------------------------------------------------------------
class LastLevelP6P7(ExtraFPNBlock):
    """P6 = conv3x3/2(P5 or C5), P7 = conv3x3/2(relu(P6)), the source named explicitly.

    torchvision's own block picks C5 only when C5's channel count differs from the FPN width, which
    silently picks P5 for e.g. an R-18 with a 512-wide FPN. Parameter names (p6, p7) and initialisation
    are torchvision's, so state dicts are interchangeable.
    """

    def __init__(self, in_channels: int, out_channels: int, source: str) -> None:
        super().__init__()
        self.source = source
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            nn.init.kaiming_uniform_(module.weight, a=1)
            nn.init.constant_(module.bias, 0)

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1] if self.source == "res5" else p[-1])
        p7 = self.p7(F.relu(p6))
        return p + [p6, p7], names + ["p6", "p7"]


class D2FrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d, evaluated as detectron2's is.

    Same buffers and the same function; only the rounding differs: without autograd detectron2 calls
    the fused `F.batch_norm` ((x - mean) * rsqrt(var + eps) * w + b), with autograd it computes
    x * scale + shift as torchvision always does. Matching it makes a converted teacher's features
    bit-identical to detectron2's instead of ~3e-5 apart after 100 layers (bench/d2_parity.py).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            return super().forward(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _d2_frozen_bn(module: nn.Module) -> None:
    """Replace every FrozenBatchNorm2d under `module` by D2FrozenBatchNorm2d, buffers kept."""
    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNorm2d) and not isinstance(child, D2FrozenBatchNorm2d):
            replacement = D2FrozenBatchNorm2d(child.weight.shape[0], eps=child.eps)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            _d2_frozen_bn(child)


def apply_backbone_options(cfg: Any, backbone: BackboneWithFPN, architecture: str) -> None:
    """MODEL.RESNETS.STRIDE_IN_1X1, MODEL.FPN.TOP_BLOCK_IN and (detectron2 conventions) FrozenBN's arithmetic."""
    if conventions(cfg) == "detectron2":
        _d2_frozen_bn(backbone.body)
    if bool(cfg.MODEL.RESNETS.STRIDE_IN_1X1):
        # The first block of layer2..4 downsamples; BasicBlocks (R-18/34) have no 1x1 conv, and
        # detectron2 ignores the option for them too.
        for name in ("layer2", "layer3", "layer4"):
            block = getattr(backbone.body, name)[0]
            if isinstance(block, Bottleneck):
                stride = block.conv2.stride
                block.conv1.stride, block.conv2.stride = stride, (1, 1)
    source = top_block_input(cfg, architecture)
    if source:
        out = int(backbone.out_channels)
        c5 = int(
            backbone.body.layer4[-1].conv3.out_channels
            if hasattr(backbone.body.layer4[-1], "conv3")
            else backbone.body.layer4[-1].conv2.out_channels
        )
        backbone.fpn.extra_blocks = LastLevelP6P7(c5 if source == "res5" else out, out, source)


# --- input and output -------------------------------------------------------------------------
def d2_detector_postprocess(detections: dict[str, Tensor], image_size: tuple[int, int]) -> dict[str, Tensor]:
    """detectron2's final step at an unchanged size: clip boxes, drop empty ones, paste masks."""
    h, w = int(image_size[0]), int(image_size[1])
    boxes = detections["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    out = {key: value[keep] for key, value in detections.items()}
    out["boxes"] = boxes[keep]
    if "masks" in out:
        out["masks"] = paste_masks_d2(out["masks"], out["boxes"], h, w)
    return out


def paste_masks_d2(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """[N, 1, M, M] mask probabilities -> [N, 1, H, W], sampled as detectron2 pastes them on the CPU.

    detectron2 maps every image pixel centre inside (box +- 1 px, rounded out) to box-relative
    coordinates in [-1, 1] and bilinearly samples the M x M mask there (align_corners=False); pixels
    outside that window stay 0. torchvision instead resizes the mask into the integer box grown by
    one mask pixel, which puts the edges elsewhere. Written here because no library exposes it
    without detectron2. Probabilities are returned (detectron2 then thresholds at 0.5).
    """
    out = masks.new_zeros((masks.shape[0], 1, height, width))
    for i in range(masks.shape[0]):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        ix0, iy0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        ix1, iy1 = min(int(math.ceil(x1)) + 1, width), min(int(math.ceil(y1)) + 1, height)
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        ys = (torch.arange(iy0, iy1, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1  # [h']
        xs = (torch.arange(ix0, ix1, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1  # [w']
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None].to(masks)  # [1, h', w', 2]
        out[i, 0, iy0:iy1, ix0:ix1] = F.grid_sample(masks[i : i + 1].float(), grid, align_corners=False)[0, 0]
    return out


# --- anchors ----------------------------------------------------------------------------------
class D2AnchorGenerator(AnchorGenerator):
    """detectron2's DefaultAnchorGenerator behind torchvision's AnchorGenerator interface.

    Cell anchors: for each size, for each aspect ratio a = h / w: w = sqrt(size^2 / a), h = a * w,
    centred on 0 (no rounding). Grid: (offset + i) * stride for the level's true stride. Order of the
    anchors of a level: y, x, cell anchor - the layout the heads' [A, K] outputs are read in.
    A subclass only because torchvision's detectors accept nothing else; none of the parent's
    anchor arithmetic is used.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[float],
        strides: Sequence[int],
        offset: float = 0.0,
    ) -> None:
        super().__init__(tuple(tuple(s) for s in sizes), (tuple(aspect_ratios),) * len(sizes))
        if not 0.0 <= offset < 1.0:
            raise UserError(
                f"MODEL.ANCHOR_GENERATOR.OFFSET {offset} is out of range.", "use a value in [0, 1), e.g. 0.0."
            )
        self.d2_sizes = [[float(v) for v in s] for s in sizes]
        self.d2_aspect_ratios = [float(a) for a in aspect_ratios]
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        for level, level_sizes in enumerate(self.d2_sizes):
            # not persistent: computed from the config, so state dicts hold no anchors
            self.register_buffer(
                f"cell_anchors_{level}", self.d2_cell_anchors(level_sizes, self.d2_aspect_ratios), persistent=False
            )

    @staticmethod
    def d2_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
        rows = []
        for size in sizes:
            area = size**2.0
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(rows, dtype=torch.float32)  # [A, 4]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(self.d2_aspect_ratios) for s in self.d2_sizes]

    def grid_anchors(self, grid_sizes: Sequence[Sequence[int]], device: torch.device) -> list[Tensor]:
        anchors = []
        for level, ((gh, gw), stride) in enumerate(zip(grid_sizes, self.strides)):
            base = getattr(self, f"cell_anchors_{level}").to(device)
            if gh == 0 or gw == 0:
                anchors.append(base.new_zeros((0, 4)))
                continue
            xs = torch.arange(self.offset * stride, gw * stride, step=stride, dtype=torch.float32, device=device)
            ys = torch.arange(self.offset * stride, gh * stride, step=stride, dtype=torch.float32, device=device)
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)) * 2, dim=1)  # [HW, 4]
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))  # [HW*A, 4]
        return anchors

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor levels")
        levels = self.grid_anchors([f.shape[-2:] for f in feature_maps], feature_maps[0].device)
        all_levels = torch.cat(levels).to(feature_maps[0].dtype)
        return [all_levels for _ in range(len(image_list.image_sizes))]


def retinanet_anchor_sizes(base_sizes: Sequence[int]) -> list[list[float]]:
    """detectron2's RetinaNet sizes: every base size at 3 octave scales 2^(0, 1/3, 2/3), unrounded."""
    return [[s * 2 ** (k / 3.0) for k in range(3)] for s in base_sizes]


# --- RoI pooling --------------------------------------------------------------------------------
class D2RoIPooler(MultiScaleRoIAlign):
    """detectron2's ROIPooler (ROIAlignV2) behind torchvision's MultiScaleRoIAlign interface.

    Each box goes to level floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8)), clamped
    to the pooled levels, and is pooled with torchvision's roi_align (aligned=True: pixel centres at
    +0.5, sampling_ratio 0: adaptive) at that level's true stride. torchvision's own pooler uses
    aligned=False, 2 samples, scales inferred from the padded image and floor(4 + log2(s / 224) + 1e-6).
    A subclass only because torchvision's R-CNNs accept nothing else.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        strides: Sequence[int],
        output_size: int,
        sampling_ratio: int = 0,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__(list(featmap_names), int(output_size), int(sampling_ratio))
        self.strides = [int(s) for s in strides]
        self.output_size = (int(output_size), int(output_size))
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = float(canonical_level)
        self.min_level = int(math.log2(self.strides[0]))
        self.max_level = int(math.log2(self.strides[-1]))

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])  # [R, 5]
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, 1.0 / self.strides[0], self.sampling_ratio, True)
        sizes = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_box_size + 1e-8))
        levels = levels.clamp(min=self.min_level, max=self.max_level).to(torch.int64) - self.min_level
        out = rois.new_zeros((rois.shape[0], features[0].shape[1], *self.output_size)).to(features[0].dtype)
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.nonzero(levels == level).squeeze(1)
            if index.numel():
                out[index] = roi_align(feature, rois[index], self.output_size, 1.0 / stride, self.sampling_ratio, True)
        return out


# --- detectron2-style inference -----------------------------------------------------------------
class D2RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with detectron2's proposal selection (find_top_rpn_proposals).

    Per level the top-k anchors by objectness logit; per image: non-finite dropped, boxes clipped,
    empty boxes (w or h <= 0) dropped, NMS per level on the logits, the first post-NMS top-k kept.
    """

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        num_images = proposals.shape[0]
        logits = objectness.detach().reshape(num_images, -1)  # [N, sum HWA]
        rows = torch.arange(num_images, device=proposals.device)[:, None]
        top_logits, top_boxes, top_levels = [], [], []
        for level, (start, count) in enumerate(zip(_starts(num_anchors_per_level), num_anchors_per_level)):
            k = min(count, self.pre_nms_top_n())
            values, index = logits[:, start : start + count].topk(k, dim=1)  # [N, k]
            top_logits.append(values)
            top_boxes.append(proposals[rows, index + start])  # [N, k, 4]
            top_levels.append(torch.full((k,), level, dtype=torch.int64, device=proposals.device))
        scores_all, boxes_all, levels = torch.cat(top_logits, 1), torch.cat(top_boxes, 1), torch.cat(top_levels)
        final_boxes, final_scores = [], []
        for boxes, scores, (h, w) in zip(boxes_all, scores_all, image_shapes):
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            boxes, scores, lvl = boxes[valid], scores[valid], levels[valid]
            boxes = torch.stack(
                [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)],
                dim=1,
            )
            keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(torch.sigmoid(scores[keep]))
        return final_boxes, final_scores


def _starts(counts: Sequence[int]) -> list[int]:
    starts, total = [], 0
    for n in counts:
        starts.append(total)
        total += n
    return starts


class D2RoIHeads(RoIHeads):
    """torchvision's RoIHeads with detectron2's fast_rcnn_inference (no 1e-2 minimum box size)."""

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)  # [R, K+1, 4]
        pred_scores = F.softmax(class_logits, -1)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, (h, w) in zip(pred_boxes.split(per_image), pred_scores.split(per_image), image_shapes):
            valid = torch.isfinite(boxes).all(dim=2).all(dim=1) & torch.isfinite(scores).all(dim=1)
            boxes, scores = boxes[valid], scores[valid]
            boxes = torch.stack(
                [
                    boxes[..., 0].clamp(0, w),
                    boxes[..., 1].clamp(0, h),
                    boxes[..., 2].clamp(0, w),
                    boxes[..., 3].clamp(0, h),
                ],
                dim=-1,
            )
            boxes, scores = boxes[:, 1:], scores[:, 1:]  # drop the background class (index 0 here)
            mask = scores > self.score_thresh  # [R, K]
            index = torch.nonzero(mask)  # row-major (proposal, class), as detectron2
            boxes, scores, labels = boxes[mask], scores[mask], index[:, 1] + 1
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


class D2RetinaNet(RetinaNet):
    """torchvision's RetinaNet; inference as detectron2's (boxes clipped after NMS, by the transform)."""

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        detections = []
        for index in range(len(image_shapes)):
            boxes_all, scores_all, labels_all = [], [], []
            for deltas, logits, level_anchors in zip(
                head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors[index]
            ):
                deltas, logits = deltas[index], logits[index]  # [HWA, 4], [HWA, K]
                num_classes = logits.shape[-1]
                scores = torch.sigmoid(logits).flatten()
                candidates = torch.nonzero(scores > self.score_thresh).squeeze(1)
                scores, order = scores[candidates].topk(min(self.topk_candidates, candidates.numel()))
                candidates = candidates[order]
                anchor_index = torch.div(candidates, num_classes, rounding_mode="floor")
                boxes_all.append(self.box_coder.decode_single(deltas[anchor_index], level_anchors[anchor_index]))
                scores_all.append(scores)
                labels_all.append(candidates % num_classes)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections


class AdelaiFCOSRegressionHead(FCOSRegressionHead):
    """torchvision's FCOS regression head plus AdelaiDet's learnt scale per level (before the ReLU)."""

    def __init__(self, in_channels: int, num_levels: int, norm_layer: Any) -> None:
        super().__init__(in_channels, 1, norm_layer=norm_layer)
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(1)) for _ in range(num_levels)])

    def forward(self, x: list[Tensor]) -> tuple[Tensor, Tensor]:
        regressions, ctrnesses = [], []
        for level, features in enumerate(x):
            tower = self.conv(features)
            regression = F.relu(self.bbox_reg(tower) * self.scales[level])  # [N, 4, H, W]
            ctrness = self.bbox_ctrness(tower)  # [N, 1, H, W]
            n = features.shape[0]
            regressions.append(regression.permute(0, 2, 3, 1).reshape(n, -1, 4))  # [N, HW, 4]
            ctrnesses.append(ctrness.permute(0, 2, 3, 1).reshape(n, -1, 1))  # [N, HW, 1]
        return torch.cat(regressions, dim=1), torch.cat(ctrnesses, dim=1)


def adelaidet_fcos_detections(
    logits: Tensor,
    regression: Tensor,
    ctrness: Tensor,
    anchors: Tensor,
    num_per_level: Sequence[int],
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    thresh_with_ctr: bool = False,
    pre_nms_topk: int = 1000,
) -> dict[str, Tensor]:
    """One image's detections by AdelaiDet's FCOSOutputs.predict_proposals.

    logits [A, K], regression [A, 4] (in strides), ctrness [A, 1], anchors [A, 4] (one stride cell
    around each location), levels concatenated. Per level: candidates where sigmoid(class) (times
    sigmoid(ctrness) with `thresh_with_ctr`, CondInst's setting) > threshold, ranked by the product
    (top `pre_nms_topk`); boxes = location -+ regression * stride, unclipped; score = sqrt(product).
    Then class-wise NMS and every detection scoring at least the `detections_per_img`-th best (ties
    kept, as AdelaiDet's kthvalue cut). `index`: each detection's location in `anchors`.
    """
    boxes_all, scores_all, labels_all, index_all = [], [], [], []
    start = 0
    for count in num_per_level:
        level = slice(start, start + count)
        probs = torch.sigmoid(logits[level])  # [HW, K]
        products = probs * torch.sigmoid(ctrness[level])  # [HW, K]
        candidates = (products if thresh_with_ctr else probs) > score_thresh
        where = torch.nonzero(candidates)  # [n, 2] (location, class), row-major
        scores = products[candidates]
        if scores.numel() > pre_nms_topk:
            scores, order = scores.topk(pre_nms_topk, sorted=False)
            where = where[order]
        location, labels = where[:, 0] + start, where[:, 1]
        cells = anchors[location]  # [n, 4]
        centre_x, centre_y = 0.5 * (cells[:, 0] + cells[:, 2]), 0.5 * (cells[:, 1] + cells[:, 3])
        stride = cells[:, 2] - cells[:, 0]
        reg = regression[location] * stride[:, None]  # [n, 4] l, t, r, b in pixels
        boxes_all.append(
            torch.stack([centre_x - reg[:, 0], centre_y - reg[:, 1], centre_x + reg[:, 2], centre_y + reg[:, 3]], dim=1)
        )
        scores_all.append(torch.sqrt(scores))
        labels_all.append(labels)
        index_all.append(location)
        start += count
    boxes, scores, labels, index = (torch.cat(x) for x in (boxes_all, scores_all, labels_all, index_all))
    keep = batched_nms(boxes, scores, labels, nms_thresh)
    if keep.numel() > detections_per_img > 0:
        threshold = torch.kthvalue(scores[keep].cpu(), keep.numel() - detections_per_img + 1).values.item()
        keep = keep[scores[keep] >= threshold]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep], "index": index[keep]}


class AdelaiFCOS(FCOS):
    """torchvision's FCOS with AdelaiDet's inference (adelaidet_fcos_detections, THRESH_WITH_CTR off)."""

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        detections = []
        for index in range(len(image_shapes)):
            per_image = {k: torch.cat([level[index] for level in v]) for k, v in head_outputs.items()}
            det = adelaidet_fcos_detections(
                per_image["cls_logits"],
                per_image["bbox_regression"],
                per_image["bbox_ctrness"],
                torch.cat(anchors[index]),
                [len(a) for a in anchors[index]],
                self.score_thresh,
                self.nms_thresh,
                self.detections_per_img,
            )
            det.pop("index")
            detections.append(det)
        return detections


class AdelaiCondInst(CondInst):
    """The project's CondInst in AdelaiDet's geometry and inference, for AdelaiDet CondInst checkpoints.

    Built with centred anchors and per-level scales (build_detectron2_style); locations, relative
    coordinates, mask upsampling (aligned_bilinear) and the ground truth's sample grid are cell-centred
    (CondInst(cell_centred=True)); detections by adelaidet_fcos_detections with THRESH_WITH_CTR on
    (AdelaiDet's Base-CondInst.yaml); masks in the padded image frame, cropped to the image.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, cell_centred=True, **kwargs)

    def select_detections(
        self, head_outputs: dict[str, Tensor], anchors: Tensor, num_per_level: list[int], image_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        det = adelaidet_fcos_detections(
            head_outputs["cls_logits"],
            head_outputs["bbox_regression"],
            head_outputs["bbox_ctrness"],
            anchors,
            num_per_level,
            self.score_thresh,
            self.nms_thresh,
            self.detections_per_img,
            thresh_with_ctr=True,
            pre_nms_topk=self.topk_candidates,
        )
        # AdelaiDet's CondInst.postprocess: boxes clipped to the image, empty ones dropped
        boxes = clip_boxes_to_image(det["boxes"], image_size)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        det["boxes"] = boxes
        return {key: value[keep] for key, value in det.items()}


# --- the model ----------------------------------------------------------------------------------
def _anchor_options(cfg: Any) -> tuple[list[float], float]:
    return [float(r) for r in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS], float(cfg.MODEL.ANCHOR_GENERATOR.OFFSET)


@ARCHITECTURES.register(RETINANET_ARCH, BUILD_D2)
def build_d2_retinanet(cfg: Any, backbone: BackboneWithFPN, num_classes: int, common: dict[str, Any]) -> nn.Module:
    """detectron2's RetinaNet on `backbone`, with torchvision's head (so the parameter names stay torchvision's)."""
    if cfg.MODEL.RETINANET.NORM:
        raise UserError(
            "MODEL.RETINANET.NORM GN is not supported with MODEL.CONVENTIONS detectron2: "
            "detectron2's GN head keeps conv biases that torchvision's drops.",
            'set MODEL.RETINANET.NORM "" (detectron2\'s default RetinaNet).',
        )
    ratios, offset = _anchor_options(cfg)
    anchors = D2AnchorGenerator(retinanet_anchor_sizes(anchor_sizes(cfg)), ratios, [8, 16, 32, 64, 128], offset)
    head = retinanet_head(cfg, int(backbone.out_channels), anchors.num_anchors_per_location()[0], num_classes)
    return D2RetinaNet(backbone, num_classes, anchor_generator=anchors, head=head, **test_options(cfg), **common)


def _adelaidet_fcos_head(backbone: BackboneWithFPN, num_classes: int) -> tuple[nn.Module, D2AnchorGenerator]:
    """torchvision's FCOS head with AdelaiDet's regression (a learnt scale per level) and centred anchors."""
    channels = int(backbone.out_channels)
    head = fcos_head(channels, num_classes)
    norm = type(head.regression_head.conv[1])
    groups = head.regression_head.conv[1].num_groups
    head.regression_head = AdelaiFCOSRegressionHead(channels, 5, lambda c: norm(groups, c))
    # One cell per location, centred on it: (i + 0.5) * stride, size = stride, as AdelaiDet's locations.
    anchors = D2AnchorGenerator([[s] for s in (8, 16, 32, 64, 128)], [1.0], [8, 16, 32, 64, 128], 0.5)
    return head, anchors


@ARCHITECTURES.register(FCOS_ARCH, BUILD_D2)
def build_adelaidet_fcos(cfg: Any, backbone: BackboneWithFPN, num_classes: int, common: dict[str, Any]) -> nn.Module:
    head, anchors = _adelaidet_fcos_head(backbone, num_classes)
    return AdelaiFCOS(backbone, num_classes, anchor_generator=anchors, head=head, **test_options(cfg), **common)


@ARCHITECTURES.register(CONDINST_ARCH, BUILD_D2)
def build_adelaidet_condinst(
    cfg: Any, backbone: BackboneWithFPN, num_classes: int, common: dict[str, Any]
) -> nn.Module:
    head, anchors = _adelaidet_fcos_head(backbone, num_classes)
    return build_condinst(
        cfg,
        backbone,
        num_classes,
        model_class=AdelaiCondInst,
        anchor_generator=anchors,
        head=head,
        topk_candidates=1000,
        **test_options(cfg),
        **common,
    )


def _d2_rcnn(cfg: Any, backbone: BackboneWithFPN, num_classes: int, common: dict[str, Any], masks: bool) -> nn.Module:
    ratios, offset = _anchor_options(cfg)
    post = test_options(cfg)
    channels = int(backbone.out_channels)
    rpn_anchors = D2AnchorGenerator([[s] for s in anchor_sizes(cfg)], ratios, [4, 8, 16, 32, 64], offset)
    names, strides = ["0", "1", "2", "3"], [4, 8, 16, 32]
    rcnn: dict[str, Any] = dict(
        rpn_anchor_generator=rpn_anchors,
        box_roi_pool=D2RoIPooler(names, strides, 7),
        rpn_pre_nms_top_n_test=D2_RPN_TOPK["pre_test"],
        rpn_post_nms_top_n_test=D2_RPN_TOPK["post_test"],
        rpn_pre_nms_top_n_train=D2_RPN_TOPK["pre_train"],
        rpn_post_nms_top_n_train=D2_RPN_TOPK["post_train"],
        box_score_thresh=post["score_thresh"],
        box_nms_thresh=post["nms_thresh"],
        box_detections_per_img=post["detections_per_img"],
        **common,
    )
    if not masks:
        model: nn.Module = FasterRCNN(backbone, num_classes, **rcnn)
    else:
        model = MaskRCNN(
            backbone,
            None,
            box_predictor=FastRCNNPredictor(1024, num_classes),
            mask_roi_pool=D2RoIPooler(names, strides, 14),
            mask_head=MaskRCNNHeads(channels, [channels] * 4, 1),
            mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
            **rcnn,
        )
    old = model.rpn
    model.rpn = D2RegionProposalNetwork(
        old.anchor_generator,
        old.head,
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        nms_thresh=0.7,
        pre_nms_top_n=dict(training=D2_RPN_TOPK["pre_train"], testing=D2_RPN_TOPK["pre_test"]),
        post_nms_top_n=dict(training=D2_RPN_TOPK["post_train"], testing=D2_RPN_TOPK["post_test"]),
    )
    heads = model.roi_heads
    model.roi_heads = D2RoIHeads(
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        0.5,
        0.5,
        512,
        0.25,
        (10.0, 10.0, 5.0, 5.0),
        post["score_thresh"],
        post["nms_thresh"],
        post["detections_per_img"],
        mask_roi_pool=heads.mask_roi_pool,
        mask_head=heads.mask_head,
        mask_predictor=heads.mask_predictor,
    )
    return model


@ARCHITECTURES.register(FASTER_RCNN_ARCH, BUILD_D2)
def build_d2_faster_rcnn(cfg: Any, backbone: BackboneWithFPN, num_classes: int, common: dict[str, Any]) -> nn.Module:
    return _d2_rcnn(cfg, backbone, num_classes, common, masks=False)


@ARCHITECTURES.register(MASK_RCNN_ARCH, BUILD_D2)
def build_d2_mask_rcnn(cfg: Any, backbone: BackboneWithFPN, num_classes: int, common: dict[str, Any]) -> nn.Module:
    return _d2_rcnn(cfg, backbone, num_classes, common, masks=True)


def presized_transform(cfg: Any, common: dict[str, Any]) -> PresizedTransform:
    """The model's transform; it also carries `describe(cfg)` for loading messages and identities."""
    d2 = conventions(cfg) == "detectron2"
    transform = PresizedTransform(
        input_format=input_format(cfg), detector_postprocess=d2_detector_postprocess if d2 else None, **common
    )
    transform.options = describe(cfg)
    return transform
