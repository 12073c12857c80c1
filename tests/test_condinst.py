"""CondInst: the parts that are easy to get wrong (dynamic head parameter layout, relative coordinates,
geometry conventions) and the promise that its detector is exactly the project's (torchvision's) FCOS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import masked_batch
from torchvision.models.detection import FCOS

from detection.modeling.detector import build_detector
from detection.modeling.meta_arch.condinst import DynamicMaskHead, fcos_matching, relative_coordinates
from detection.modeling.meta_arch.mask_ops import upsample_corner_aligned

K = 4


def _model(cfg_tiny, **condinst):
    cfg = cfg_tiny.clone()
    cfg.MODEL.META_ARCHITECTURE = "CondInst"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.CONDINST.MASK_BRANCH.CHANNELS = 32
    cfg.merge_from_dict({"MODEL": {"CONDINST": condinst}})
    torch.manual_seed(0)
    return build_detector(cfg, K + 1)


def _images():
    return masked_batch()[0]


def test_dynamic_head_parameter_count_and_split():
    head = DynamicMaskHead(in_channels=8, channels=8, num_layers=3)
    # AdelaiDet's 169: weights (8+2)x8, 8x8, 8x1 then biases 8, 8, 1
    assert head.num_params == 169 and head.weight_nums == [80, 64, 8] and head.bias_nums == [8, 8, 1]
    params = torch.arange(2 * 169, dtype=torch.float32).reshape(2, 169)
    weights, biases = head.split_params(params)
    assert [tuple(w.shape) for w in weights] == [(2, 8, 10), (2, 8, 8), (2, 1, 8)]
    assert [tuple(b.shape) for b in biases] == [(2, 8), (2, 8), (2, 1)]
    # all weights first (row-major [out, in] per layer), then all biases
    assert torch.equal(weights[0][1], params[1, :80].reshape(8, 10))
    assert torch.equal(weights[2][0, 0], params[0, 144:152])
    assert torch.equal(biases[0][0], params[0, 152:160]) and torch.equal(biases[2][1], params[1, 168:169])
    single = DynamicMaskHead(in_channels=8, channels=8, num_layers=1)
    assert single.num_params == 10 + 1


def test_dynamic_head_equals_grouped_convolutions():
    """The per-instance batched matmuls are the grouped 1x1 convolutions of the paper's formulation."""
    g = torch.Generator().manual_seed(1)
    head = DynamicMaskHead(in_channels=8, channels=8, num_layers=3)
    feats = torch.randn(2, 8, 6, 7, generator=g)
    params = torch.randn(3, head.num_params, generator=g)
    locations = torch.tensor([[8.0, 16.0], [0.0, 0.0], [40.0, 8.0]])
    scales = torch.tensor([64.0, 128.0, 64.0])
    im_inds = torch.tensor([0, 1, 1])
    out = head(feats, 8, params, locations, scales, im_inds)
    assert out.shape == (3, 1, 6, 7)

    coords = relative_coordinates(locations, scales, 6, 7, 8)
    x = torch.cat([coords, feats[im_inds]], 1).reshape(1, 3 * 10, 6, 7)  # instances as groups
    weights, biases = head.split_params(params)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w.reshape(-1, w.shape[-1], 1, 1), b.reshape(-1), groups=3)
        x = F.relu(x) if layer < 2 else x
    torch.testing.assert_close(out, x.reshape(3, 1, 6, 7))


def test_relative_coordinates():
    rel = relative_coordinates(torch.tensor([[16.0, 8.0]]), torch.tensor([64.0]), h=3, w=4, stride=8)
    assert rel.shape == (1, 2, 3, 4)
    assert torch.equal(rel[0, :, 1, 2], torch.zeros(2))  # the instance's own pixel (x 16 = 2 x 8, y 8 = 1 x 8)
    assert torch.allclose(rel[0, :, 0, 0], torch.tensor([16 / 64, 8 / 64]))  # channel 0 is x, channel 1 is y
    assert torch.allclose(rel[0, :, 2, 3], torch.tensor([(16 - 24) / 64, (8 - 16) / 64]))


def test_mask_grid_is_where_fcos_puts_its_points(cfg_tiny):
    """torchvision's FCOS points of P3 sit on image pixels (8j, 8i): the mask features' own convention."""
    model = _model(cfg_tiny).eval()
    image_list = model.preprocess(_images())
    feats = list(model.features(image_list.tensors).values())
    anchors = model.model.anchor_generator(image_list, feats)[0]
    h, w = feats[0].shape[-2:]
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2)[: h * w].reshape(h, w, 2)
    assert torch.equal(centres[..., 0], (torch.arange(w) * 8.0).expand(h, w))
    assert torch.equal(centres[..., 1], (torch.arange(h) * 8.0)[:, None].expand(h, w))
    # an instance on P3 point (i, j) has relative coordinates 0 exactly at mask pixel (i, j)
    rel = relative_coordinates(centres[1, 2][None], torch.tensor([64.0]), h, w, 8)
    assert torch.equal(rel[0, :, 1, 2], torch.zeros(2))


def test_upsampling_keeps_the_corner_convention():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    up = upsample_corner_aligned(x, 4)
    assert up.shape == (1, 1, 12, 16)
    assert torch.equal(up[..., ::4, ::4], x)  # output pixel 4i sits on input pixel i
    assert torch.allclose(up[0, 0, 0, 1:4], torch.tensor([0.25, 0.5, 0.75]))  # linear in between
    assert torch.equal(up[0, 0, 0, 12:], torch.full((4,), 3.0))  # held beyond the last column


def test_centred_geometry_is_adelaidets():
    """AdelaiDet's grid (pixel i at i * s + s // 2): aligned_bilinear puts output pixel j on input
    coordinate (j - f // 2) / f, held at both edges; relative coordinates measure from cell centres."""
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    up = upsample_corner_aligned(x, 4, centred=True)
    assert up.shape == (1, 1, 12, 16)
    assert torch.equal(up[..., 2::4, 2::4], x)  # output pixel 4i + 2 (image 4 * (4i + 2) + 2 = 16i + 10)
    assert torch.equal(up[0, 0, 0, :3], torch.zeros(3))  # held before the first input pixel
    assert torch.allclose(up[0, 0, 0, 3:6], torch.tensor([0.25, 0.5, 0.75]))
    coords = relative_coordinates(torch.tensor([[20.0, 12.0]]), torch.tensor([64.0]), h=3, w=4, stride=8, offset=0.5)
    assert torch.equal(coords[0, :, 1, 2], torch.zeros(2))  # mask pixel (1, 2) is the cell centred on (20, 12)


def test_adelaidet_conventions_train_and_eval(cfg_tiny):
    """MODEL.CONVENTIONS detectron2 builds AdelaiDet's CondInst (centred anchors, per-level scales) that
    trains and infers; its ground truth is sampled on the centred grid."""
    from detection.interop.d2_conventions import AdelaiCondInst

    cfg = cfg_tiny.clone()
    cfg.merge_from_dict(
        {
            "MODEL": {
                "META_ARCHITECTURE": "CondInst",
                "MASK_ON": True,
                "CONVENTIONS": "detectron2",
                "CONDINST": {"MASK_BRANCH": {"CHANNELS": 32}, "MAX_PROPOSALS": 5},
            }
        }
    )
    torch.manual_seed(0)
    model = build_detector(cfg, K + 1)
    inner = model.model
    assert isinstance(inner, AdelaiCondInst) and inner.cell_centred and len(inner.head.regression_head.scales) == 5
    images, targets = masked_batch()
    model.train()
    losses, _, _ = model(images, targets)
    assert 0 < losses["loss_mask"].item() <= 1 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert inner.head.regression_head.scales[0].grad is not None
    model.eval()
    with torch.no_grad():
        detections, _, _ = model(images)
    for det, (h, w) in zip(detections, [(50, 70), (64, 45)]):
        assert det["masks"].shape == (len(det["boxes"]), 1, h, w)
        assert (det["boxes"][:, 2:] > det["boxes"][:, :2]).all() and (det["boxes"][:, 2] <= w).all()


def test_detector_is_torchvisions_fcos(cfg_tiny):
    """Head outputs, the matching (given box centres), the losses and the detections are torchvision's FCOS."""
    model = _model(cfg_tiny)
    fcos = model.model
    images = _images()
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [35.0, 10.0, 66.0, 33.0]]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    image_list = model.preprocess(images)
    feats = list(model.features(image_list.tensors).values())
    ours, params = fcos.predict(feats)
    theirs = fcos.head(feats)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert params.shape == (2, ours["cls_logits"].shape[1], 169)

    anchors = fcos.anchor_generator(image_list, feats)
    num = [f.shape[-2] * f.shape[-1] for f in feats]
    matched = [
        fcos_matching(a, num, t["boxes"], (t["boxes"][:, :2] + t["boxes"][:, 2:]) / 2, 1.5)
        for a, t in zip(anchors, targets)
    ]
    assert (matched[0] >= 0).any() and (matched[1] < 0).all()
    losses = fcos.head.compute_loss(targets, theirs, anchors, matched)
    reference = FCOS.compute_loss(fcos, targets, theirs, anchors, num)  # torchvision's own matching
    for key in reference:
        torch.testing.assert_close(losses[key], reference[key], rtol=0, atol=0)

    split = {k: list(v.split(num, dim=1)) for k, v in theirs.items()}
    expected = fcos.postprocess_detections(split, [list(a.split(num)) for a in anchors], image_list.image_sizes)
    for i, size in enumerate(image_list.image_sizes):
        det = fcos.select_detections({k: v[i] for k, v in theirs.items()}, anchors[i], num, size)
        assert det["index"].shape == det["scores"].shape
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(det[key], expected[i][key], rtol=0, atol=0)


def test_train_and_eval_forward(cfg_tiny):
    model = _model(cfg_tiny, MAX_PROPOSALS=5)
    images, targets = masked_batch()
    model.train()
    losses, features, _ = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness", "loss_mask"}
    assert 0 < losses["loss_mask"].item() <= 1 and list(features) == ["p3", "p4", "p5", "p6", "p7"]
    sum(losses.values()).backward()
    inner = model.model
    for part in (inner.controller, inner.mask_branch, inner.head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters() if p.requires_grad)

    model.eval()
    with torch.no_grad():
        detections, _, _ = model(images)
    for det, (h, w) in zip(detections, [(50, 70), (64, 45)]):
        assert det["masks"].shape == (len(det["boxes"]), 1, h, w)
        assert det["masks"].min() >= 0 and det["masks"].max() <= 1
        assert set(det) == {"boxes", "scores", "labels", "masks"}
