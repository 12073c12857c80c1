"""The detector zoo: every architecture trains and infers on pre-resized images, exposes its FPN levels
under uniform names and strides, computes exactly torchvision's losses, and shares FPN + head weights."""

from __future__ import annotations

import math

import pytest
import torch

from detection.errors import UserError
from detection.modeling.architectures import ARCHITECTURES, LEVEL_STRIDES
from detection.modeling.detector import build_detector

ARCHS = ["RetinaNet", "FCOS", "FasterRCNN", "MaskRCNN"]
K = 4  # foreground classes


def _cfg(cfg, arch: str, **model):
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.MASK_ON = arch == "MaskRCNN"
    for key, value in model.items():
        cfg.MODEL[key] = value
    return cfg


def _batch(with_masks: bool):
    """Two images of different, non-divisible sizes (the second without objects) and their targets."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 50, 70, generator=g) * 255, torch.rand(3, 64, 45, generator=g) * 255]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [35.0, 10.0, 66.0, 33.0]]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    if with_masks:
        masks = torch.zeros(2, 50, 70, dtype=torch.uint8)
        masks[0, 6:40, 4:30] = 1
        masks[1, 10:33, 35:66] = 1
        targets[0]["masks"] = masks
        targets[1]["masks"] = torch.zeros(0, 64, 45, dtype=torch.uint8)
    return images, targets


@pytest.mark.parametrize("arch", ARCHS)
def test_train_and_eval_forward(cfg_tiny, arch):
    torch.manual_seed(0)
    model = build_detector(_cfg(cfg_tiny, arch), K + 1)
    images, targets = _batch(arch == "MaskRCNN")
    assert model.levels == list(ARCHITECTURES.get(arch).levels)
    assert model.strides == {name: LEVEL_STRIDES[name] for name in model.levels}

    model.train()
    losses, features, image_list = model(images, targets)
    # no resize: the model sees the images as given, zero-padded to a multiple of 32 (64 x 96)
    assert image_list.image_sizes == [(50, 70), (64, 45)]
    assert tuple(image_list.tensors.shape) == (2, 3, 64, 96)
    assert list(features) == model.levels
    for name, feature in features.items():
        stride = model.strides[name]
        assert tuple(feature.shape) == (2, 32, math.ceil(64 / stride), math.ceil(96 / stride)), name
        feature.retain_grad()
    expected = {
        "RetinaNet": {"classification", "bbox_regression"},
        "FCOS": {"classification", "bbox_regression", "bbox_ctrness"},
        "FasterRCNN": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    }
    expected["MaskRCNN"] = expected["FasterRCNN"] | {"loss_mask"}
    assert set(losses) == expected[arch]
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # the returned features are the ones the heads used: detection losses reach every level
    for name, feature in features.items():
        assert feature.grad is not None and feature.grad.abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        detections, features, image_list = model(images)
    assert list(features) == model.levels and len(detections) == 2
    for det, (h, w) in zip(detections, [(50, 70), (64, 45)]):
        boxes = det["boxes"]
        # boxes stay in the frame of the image that was given (not the padded batch)
        assert boxes.numel() == 0 or (boxes[:, 2].max() <= w and boxes[:, 3].max() <= h and boxes.min() >= 0)
        assert det["labels"].numel() == 0 or det["labels"].max() <= K
        if arch == "MaskRCNN":
            assert tuple(det["masks"].shape[1:]) == (1, h, w)


@pytest.mark.parametrize("arch", ARCHS)
def test_losses_and_detections_are_torchvisions(cfg_tiny, arch):
    """The adapter re-assembles torchvision's forward from its parts: same numbers as model.model(...)."""
    torch.manual_seed(0)
    model = build_detector(_cfg(cfg_tiny, arch), K + 1)
    images, targets = _batch(arch == "MaskRCNN")
    model.train()
    torch.manual_seed(1)  # R-CNN samplers draw from the global generator
    ours, _, _ = model(images, targets)
    torch.manual_seed(1)
    theirs = model.model(images, targets)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        ours, _, _ = model(images)
        theirs = model.model(images)
    for a, b in zip(ours, theirs):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_features_of_preprocessed_batch_match_forward(cfg_tiny):
    """What stage one dumps (features of preprocess(images)) is what the detector computes on."""
    model = build_detector(_cfg(cfg_tiny, "RetinaNet"), K + 1).eval()
    images, _ = _batch(False)
    with torch.no_grad():
        _, from_forward, image_list = model(images)
        dumped = model.features(model.preprocess(images).tensors)
    assert list(dumped) == list(from_forward)
    for name in dumped:
        torch.testing.assert_close(dumped[name], from_forward[name], rtol=0, atol=0)
    # normalisation uses MODEL.PIXEL_MEAN/STD in 0-255 units; padding is zero after normalisation
    mean = torch.tensor(cfg_tiny.MODEL.PIXEL_MEAN)[:, None, None]
    batched = model.preprocess([mean.expand(3, 10, 20).clone()]).tensors
    assert tuple(batched.shape) == (1, 3, 32, 32) and batched.abs().max() < 1e-5


def test_fpn_and_head_transfer_between_depths_and_class_counts(cfg_tiny):
    torch.manual_seed(0)
    teacher = build_detector(
        _cfg(cfg_tiny.clone(), "RetinaNet", BACKBONE={"DEPTH": 34, "NORM": "BN", "FREEZE_AT": 0}), K + 1
    )
    state = teacher.fpn_and_head_state_dict()
    assert state and not any(k.startswith("backbone.body.") for k in state)
    assert any(k.startswith("backbone.fpn.") for k in state) and any(k.startswith("head.") for k in state)

    torch.manual_seed(1)
    student = build_detector(_cfg(cfg_tiny.clone(), "RetinaNet"), K + 1)  # same FPN input widths
    assert student.load_fpn_and_head(state) == []
    loaded = student.fpn_and_head_state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    other = build_detector(_cfg(cfg_tiny.clone(), "RetinaNet"), K + 3)  # two more classes
    skipped = other.load_fpn_and_head(state)
    assert skipped == ["head.classification_head.cls_logits.bias", "head.classification_head.cls_logits.weight"]


def test_frozen_bn_and_freeze_at(cfg_tiny):
    cfg = _cfg(cfg_tiny, "FasterRCNN", BACKBONE={"DEPTH": 18, "NORM": "FrozenBN", "FREEZE_AT": 2})
    model = build_detector(cfg, K + 1)
    body = model.model.backbone.body
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith(("conv1", "layer1")))
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith("layer2"))
    assert type(body.bn1).__name__ == "FrozenBatchNorm2d"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"META_ARCHITECTURE": "YOLO"}, "META_ARCHITECTURE 'YOLO'"),
        ({"BACKBONE": {"DEPTH": 152}}, "DEPTH 152"),
        ({"BACKBONE": {"NORM": "SyncBN"}}, "NORM 'SyncBN'"),
        ({"META_ARCHITECTURE": "FCOS", "FPN": {"OUT_CHANNELS": 48}}, "divisible by 32"),
        ({"RETINANET": {"NORM": "GN"}, "FPN": {"OUT_CHANNELS": 40}}, "divisible by 32"),
        ({"RETINANET": {"NORM": "BN"}}, "RETINANET.NORM"),
        ({"MASK_ON": True}, "MASK_ON"),
        ({"ANCHOR_GENERATOR": {"SIZES": [8, 16]}}, "5 positive base sizes"),
        ({"META_ARCHITECTURE": "CondInst"}, "CondInst needs MODEL.MASK_ON True"),
        ({"META_ARCHITECTURE": "SOLOv2"}, "SOLOv2 needs MODEL.MASK_ON True"),
        ({"META_ARCHITECTURE": "CondInst", "MASK_ON": True, "CONDINST": {"MASK_OUT_STRIDE": 3}}, "MASK_OUT_STRIDE 3"),
        (
            {"META_ARCHITECTURE": "CondInst", "MASK_ON": True, "CONDINST": {"MASK_BRANCH": {"NORM": "SyncBN"}}},
            "MASK_BRANCH.NORM 'SyncBN'",
        ),
        ({"META_ARCHITECTURE": "SOLOv2", "MASK_ON": True, "SOLOV2": {"NUM_GRIDS": [40, 36]}}, "5 positive grid sizes"),
        ({"META_ARCHITECTURE": "SOLOv2", "MASK_ON": True, "SOLOV2": {"NMS_KERNEL": "box"}}, "NMS_KERNEL 'box'"),
        ({"META_ARCHITECTURE": "SOLOv2", "MASK_ON": True, "SOLOV2": {"INSTANCE_CHANNELS": 40}}, "multiple of 16"),
        (
            {"META_ARCHITECTURE": "SOLOv2", "MASK_ON": True, "CONVENTIONS": "detectron2"},
            "CONVENTIONS detectron2 does not",
        ),
        ({"META_ARCHITECTURE": "CondInst", "MASK_ON": True, "BACKEND": "detectron2"}, "BACKEND detectron2 does not"),
        ({"META_ARCHITECTURE": "SOLOv2", "MASK_ON": True, "FPN": {"TOP_BLOCK_IN": "res5"}}, "does not apply to SOLOv2"),
    ],
)
def test_bad_model_config_is_a_user_error(cfg_tiny, overrides, message):
    cfg_tiny.merge_from_dict({"MODEL": overrides})
    with pytest.raises(UserError, match=message) as info:
        build_detector(cfg_tiny, K + 1)
    assert info.value.fix


def test_needs_a_foreground_class(cfg_tiny):
    with pytest.raises(UserError, match="at least one foreground class"):
        build_detector(cfg_tiny, 1)
