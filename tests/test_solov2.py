"""SOLOv2: grid assignment (centre region, scale ranges), Matrix NMS against a naive loop, point NMS, the
inference pipeline on hand-made predictions, and a training/eval forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import masked_batch

from detection.modeling.detector import build_detector
from detection.modeling.meta_arch.solov2 import boxes_of_masks, matrix_nms, point_nms, solo_targets

K = 4


def _square(size: int, y0: int, x0: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One instance: its box [1, 4] (pixel edges) and mask [1, size, size] covering rows y0..y0+h-1, cols x0..x0+w-1."""
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[0, y0 : y0 + h, x0 : x0 + w] = 1
    return torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32), mask


def _cells(rows, cols, grid):
    return sorted(r * grid + c for r in rows for c in cols)


def test_centre_region_of_a_40px_object():
    # 40 x 40 px at 44..83 in a 128 px image: centre of mass 63.5, sqrt(area) 40 -> level 0 only (1..96)
    boxes, masks = _square(128, 44, 44, 40, 40)
    levels = solo_targets(boxes, masks)
    # level 0 (S = 40): centre cell floor(63.5 / 128 * 40) = 19; sigma region 63.5 -+ 0.2 * 20 = 59.5 .. 67.5
    # -> cells 18 .. 21, clipped to one cell around 19 -> 18 .. 20
    cells, owners = levels[0]
    assert sorted(cells.tolist()) == _cells(range(18, 21), range(18, 21), 40) and owners.tolist() == [0] * 9
    assert all(c.numel() == 0 for c, _ in levels[1:])


def test_scale_ranges_are_inclusive_and_overlap():
    boxes, masks = _square(256, 78, 78, 100, 100)  # sqrt(area) 100: in (48, 192) and (96, 384)
    assert [c.numel() > 0 for c, _ in solo_targets(boxes, masks)] == [False, True, True, False, False]
    boxes, masks = _square(256, 10, 10, 48, 48)  # 48 is in (1, 96) and at the lower bound of (48, 192)
    assert [c.numel() > 0 for c, _ in solo_targets(boxes, masks)] == [True, True, False, False, False]


def test_small_object_gets_its_centre_cell_only_and_the_region_is_clipped():
    # 10 x 10 px at 29..38: centre 33.5 -+ 1 stays inside cell 10 (32 .. 35.2) of the 40-grid
    boxes, masks = _square(128, 29, 29, 10, 10)
    cells, owners = solo_targets(boxes, masks)[0]
    assert cells.tolist() == [10 * 40 + 10] and owners.tolist() == [0]
    # sigma 1: the region would span the whole box; it is clipped to one cell around the centre's
    boxes, masks = _square(128, 44, 44, 40, 40)
    cells, _ = solo_targets(boxes, masks, sigma=1.0)[0]
    assert sorted(cells.tolist()) == _cells(range(18, 21), range(18, 21), 40)


def test_centre_of_mass_not_box_centre_and_empty_masks_skipped():
    # an L-shaped mask: the box centre is (20, 20) but the mass sits in the top-left
    mask = torch.zeros(2, 128, 128, dtype=torch.uint8)
    mask[0, 0:40, 0:8] = 1
    mask[0, 0:8, 0:40] = 1
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [60.0, 60.0, 100.0, 100.0]])  # the second has an empty mask
    cells, owners = solo_targets(boxes, mask)[0]
    # centre of mass (320 x 3.5 + 320 x 19.5 - 64 x 3.5) / 576 = 12.39 in x and y: cell 3 of 3.2 px cells
    # (the box centre 20 would be cell 6); region 12.39 -+ 4 -> cells 2 .. 5, clipped to 2 .. 4
    assert sorted(cells.tolist()) == _cells(range(2, 5), range(2, 5), 40)
    assert set(owners.tolist()) == {0}  # the empty mask of instance 1 is not assigned


def _naive_matrix_nms(labels, masks, scores, sigma, kernel):
    """SOLOv2's definition, one pair at a time."""
    n = len(scores)
    flat = masks.reshape(n, -1).float()

    def iou(i, j):
        if labels[i] != labels[j]:
            return 0.0
        inter = float((flat[i] * flat[j]).sum())
        return inter / float(flat[i].sum() + flat[j].sum() - inter)

    def f(x):
        return math.exp(-sigma * x * x) if kernel == "gaussian" else 1.0 - x

    compensate = [max([iou(k, i) for k in range(i)], default=0.0) for i in range(n)]
    decay = [min([f(iou(i, j)) / f(compensate[i]) for i in range(j)], default=1.0) for j in range(n)]
    return torch.tensor([s * d for s, d in zip(scores.tolist(), decay)])


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_matches_a_naive_loop(kernel):
    g = torch.Generator().manual_seed(0)
    n = 14
    masks = torch.zeros(n, 24, 24, dtype=torch.bool)
    for i in range(n):  # overlapping random rectangles
        y, x = torch.randint(0, 12, (2,), generator=g).tolist()
        h, w = torch.randint(5, 12, (2,), generator=g).tolist()
        masks[i, y : y + h, x : x + w] = True
    labels = torch.randint(0, 3, (n,), generator=g)
    scores = torch.rand(n, generator=g).sort(descending=True).values
    ours = matrix_nms(labels, masks, scores, sigma=2.0, kernel=kernel)
    expected = _naive_matrix_nms(labels, masks, scores, 2.0, kernel)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert (ours <= scores + 1e-7).all() and ours[0] == scores[0]
    assert matrix_nms(labels[:0], masks[:0], scores[:0]).numel() == 0


def test_point_nms_keeps_cells_not_below_their_up_left_neighbours():
    heat = torch.tensor([[[[0.1, 0.9, 0.2], [0.8, 0.3, 0.7], [0.1, 0.6, 0.65]]]])
    kept = point_nms(heat)[0, 0]
    # a cell survives if no neighbour above, to the left or above-left is higher
    expected = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(kept, expected)


def test_boxes_of_masks():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    assert boxes_of_masks(masks).tolist() == [[3.0, 2.0, 7.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def _model(cfg_tiny, **solov2):
    cfg = cfg_tiny.clone()
    cfg.MODEL.META_ARCHITECTURE = "SOLOv2"
    cfg.MODEL.MASK_ON = True
    cfg.merge_from_dict(
        {"MODEL": {"SOLOV2": {"INSTANCE_CHANNELS": 32, "NUM_MASKS": 32, "MASK_CHANNELS": 32, **solov2}}}
    )
    torch.manual_seed(0)
    return build_detector(cfg, K + 1)


def test_inference_on_hand_made_predictions(cfg_tiny):
    """Point NMS, the area/maskness filters, Matrix NMS and the upsampled masks, on predictions made by hand."""
    solo = _model(cfg_tiny, NUM_MASKS=32).model.eval()
    grids = solo.num_grids
    cate = [torch.full((1, K, s, s), -10.0) for s in grids]
    kernels = [torch.zeros(1, 32, s, s) for s in grids]
    cate[0][0, 2, 5, 7] = 3.0  # class 3 (label 3), the best
    cate[0][0, 2, 6, 7] = 2.9  # below its upper neighbour: removed by point NMS
    cate[0][0, 2, 20, 30] = 2.0  # same class, same mask: decayed by Matrix NMS
    cate[0][0, 0, 30, 30] = 1.0  # another class, same mask: kept as is
    for row, col in ((5, 7), (6, 7), (20, 30), (30, 30)):
        kernels[0][0, 0, row, col] = 10.0
    feats = -torch.ones(32, 16, 16)
    feats[0, 4:10, 2:8] = 1.0  # the mask at stride 4: rows 4..9, cols 2..7
    det = solo.detect_single(0, cate, kernels, feats, (64, 60))
    assert det["labels"].tolist() == [3, 1, 3]
    s = torch.sigmoid(torch.tensor([3.0, 1.0, 2.0]))
    maskness = torch.sigmoid(torch.tensor(10.0))
    torch.testing.assert_close(det["scores"], torch.stack([s[0], s[1], s[2] * math.exp(-2.0)]) * maskness)
    assert det["masks"].shape == (3, 1, 64, 60)
    binary = det["masks"][0, 0] > 0.5
    assert binary[18:38, 10:30].all() and not binary[:14].any() and not binary[:, 34:].any()
    box = det["boxes"][0].tolist()
    assert 6 <= box[0] <= 10 and 14 <= box[1] <= 18 and 30 <= box[2] <= 34 and 38 <= box[3] <= 42
    # nothing above the threshold: an empty, well-formed result
    empty = solo.detect_single(0, [c - 100 for c in cate], kernels, feats, (64, 60))
    assert empty["masks"].shape == (0, 1, 64, 60) and empty["boxes"].shape == (0, 4)


def test_train_and_eval_forward(cfg_tiny):
    model = _model(cfg_tiny)
    images, targets = masked_batch()
    model.train()
    losses, features, _ = model(images, targets)
    assert set(losses) == {"loss_ins", "loss_cate"} and list(features) == ["p2", "p3", "p4", "p5", "p6"]
    assert 0 < losses["loss_ins"].item() <= 3 and losses["loss_cate"].item() > 0
    sum(losses.values()).backward()
    for part in (model.model.ins_head, model.model.mask_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    for name, feature in features.items():  # every FPN level feeds the heads
        assert feature.grad_fn is not None, name

    model.eval()
    with torch.no_grad():
        detections, _, _ = model(images)
    for det, (h, w) in zip(detections, [(50, 70), (64, 45)]):
        assert set(det) == {"boxes", "scores", "labels", "masks"} and det["masks"].shape[1:] == (1, h, w)
