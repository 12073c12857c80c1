"""detectron2-compatible architecture options, the backend switch and a backend-agnostic cache (no detectron2)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_d2_checkpoint import D2_OPTIONS, FPN, d2_state, write_pkl
from torchvision.ops import roi_align

from cache_contract.identity import preprocessing_identity
from cache_contract.teacher import load_teacher, sample_features
from cache_format import CacheReader, check_compatibility
from cache_format.errors import CacheError
from detection.config import CfgNode, save_config
from detection.data.datasets import load_dataset
from detection.errors import UserError
from detection.interop.d2_conventions import D2AnchorGenerator, D2RoIPooler, d2_detector_postprocess
from detection.modeling.detector import build_detector
from stage1_teacher_dump import cli as dump_cli
from stage2_student_distill.cli import student_identity

HAVE_D2 = importlib.util.find_spec("detectron2") is not None


def d2_cfg(cfg_tiny: CfgNode, arch: str = "RetinaNet", **model) -> CfgNode:
    cfg = cfg_tiny.clone()
    cfg.merge_from_dict(
        {
            "MODEL": {
                "META_ARCHITECTURE": arch,
                "MASK_ON": arch == "MaskRCNN",
                **D2_OPTIONS,
                "FPN": {"OUT_CHANNELS": FPN},
                **model,
            }
        },
        source="test",
    )
    return cfg


def test_anchors_are_detectrons_exact_cells_in_its_order_at_true_strides():
    sizes = [[32.0, 32.0 * 2 ** (1 / 3)], [64.0, 64.0 * 2 ** (1 / 3)]]
    generator = D2AnchorGenerator(sizes, [0.5, 1.0, 2.0], [8, 64], offset=0.0)
    assert generator.num_anchors_per_location() == [6, 6]
    cells = generator.cell_anchors_0
    w = math.sqrt(32.0**2 / 0.5)  # size-major, then aspect ratio h / w; unrounded
    torch.testing.assert_close(cells[0], torch.tensor([-w / 2, -0.5 * w / 2, w / 2, 0.5 * w / 2]))
    s = 32.0 * 2 ** (1 / 3)
    torch.testing.assert_close(cells[4], torch.tensor([-s / 2, -s / 2, s / 2, s / 2]))
    # A 96 x 128 image: P3 12 x 16 at stride 8; P6 2 x 2 at stride 64 (torchvision would use 96 // 2 = 48).
    from torchvision.models.detection.image_list import ImageList

    anchors = generator(
        ImageList(torch.zeros(1, 3, 96, 128), [(96, 128)]), [torch.zeros(1, 1, 12, 16), torch.zeros(1, 1, 2, 2)]
    )[0]
    assert anchors.shape == (12 * 16 * 6 + 2 * 2 * 6, 4)
    y, x, a = 1, 2, 4  # order of a level: y, x, cell anchor
    torch.testing.assert_close(anchors[(y * 16 + x) * 6 + a], cells[a] + torch.tensor([16.0, 8.0, 16.0, 8.0]))
    p6 = anchors[12 * 16 * 6 :]
    torch.testing.assert_close(p6[(1 * 2 + 1) * 6], generator.cell_anchors_1[0] + 64.0)


def test_pooler_assigns_levels_like_detectron2_and_pools_aligned():
    names, strides = ["0", "1", "2", "3"], [4, 8, 16, 32]
    size = 2048  # the image; every box below lies inside it
    features = {n: torch.full((1, 2, size // s, size // s), float(i)) for i, (n, s) in enumerate(zip(names, strides))}
    pooler = D2RoIPooler(names, strides, 7)
    # sqrt(area): 10 -> P2 (clamped), 112 -> P3, 223.9 -> P3, 224 -> P4, 2000 -> P5 (clamped)
    sides = [10.0, 112.0, 223.9, 224.0, 2000.0]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    pooled = pooler(features, [boxes], [(size, size)])
    assert pooled[:, 0, 3, 3].tolist() == [0.0, 1.0, 1.0, 2.0, 3.0]
    ramp = {
        n: torch.arange(64 // s * 64 // s, dtype=torch.float32).reshape(1, 1, 64 // s, 64 // s)
        for n, s in zip(names, strides)
    }
    box = torch.tensor([[3.3, 5.1, 40.7, 30.2]])  # sqrt(area) ~ 31 -> P2
    expected = roi_align(ramp["0"], [box], (7, 7), spatial_scale=1 / 4, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(pooler(ramp, [box], [(64, 64)]), expected)


def test_backbone_options(cfg_tiny):
    r50 = build_detector(d2_cfg(cfg_tiny, BACKBONE={"DEPTH": 50}), 4).model.backbone
    assert r50.body.layer2[0].conv1.stride == (2, 2) and r50.body.layer2[0].conv2.stride == (1, 1)
    assert r50.fpn.extra_blocks.p6.in_channels == 2048  # detectron2's RetinaNet: P6 from C5
    tv = d2_cfg(
        cfg_tiny,
        CONVENTIONS="torchvision",
        INPUT_FORMAT="RGB",
        RESNETS={"STRIDE_IN_1X1": False},
        BACKBONE={"DEPTH": 50},
    )
    r50 = build_detector(tv, 4).model.backbone
    assert r50.body.layer2[0].conv1.stride == (1, 1) and r50.body.layer2[0].conv2.stride == (2, 2)
    assert r50.fpn.extra_blocks.p6.in_channels == FPN  # torchvision: from P5
    r18 = build_detector(d2_cfg(cfg_tiny, FPN={"OUT_CHANNELS": 512, "TOP_BLOCK_IN": "p5"}), 4).model.backbone
    assert r18.fpn.extra_blocks.source == "p5"  # torchvision's block would pick C5 by channel count here
    with pytest.raises(UserError, match="TOP_BLOCK_IN res5 does not apply to FasterRCNN"):
        build_detector(d2_cfg(cfg_tiny, "FasterRCNN", FPN={"OUT_CHANNELS": FPN, "TOP_BLOCK_IN": "res5"}), 4)
    with pytest.raises(UserError, match="MODEL.INPUT_FORMAT 'YUV'"):
        build_detector(d2_cfg(cfg_tiny, INPUT_FORMAT="YUV"), 4)


def test_bgr_models_normalise_the_flipped_rgb_image(cfg_tiny):
    model = build_detector(d2_cfg(cfg_tiny, PIXEL_STD=[57.0, 57.0, 58.0]), 4)
    image = torch.rand(3, 64, 96) * 255
    mean, std = torch.tensor([103.53, 116.28, 123.675])[:, None, None], torch.tensor([57.0, 57.0, 58.0])[:, None, None]
    torch.testing.assert_close(model.preprocess([image]).tensors[0], (image.flip(0) - mean) / std)


def test_retinanet_clips_after_nms_as_detectron2(cfg_tiny):
    """Two boxes overlapping only once clipped: detectron2 keeps both (NMS first), torchvision one."""
    anchors = torch.tensor([[-100.0, 0.0, 60.0, 60.0], [0.0, 0.0, 60.0, 60.0]])
    logits = torch.full((1, 2, 4), -20.0)
    logits[0, 0, 1], logits[0, 1, 1] = 3.0, 2.0
    outputs = {"cls_logits": [logits], "bbox_regression": [torch.zeros(1, 2, 4)]}
    counts = {}
    for conventions in ("detectron2", "torchvision"):
        model = build_detector(d2_cfg(cfg_tiny, CONVENTIONS=conventions), 4).model.eval()
        dets = model.postprocess_detections(outputs, [[anchors]], [(64, 64)])
        dets = model.transform.postprocess(dets, [(64, 64)], [(64, 64)])
        counts[conventions] = len(dets[0]["boxes"])
        assert (dets[0]["boxes"] >= 0).all() and (dets[0]["boxes"] <= 64).all()
    assert counts == {"detectron2": 2, "torchvision": 1}
    empty = d2_detector_postprocess(
        {
            "boxes": torch.tensor([[70.0, 0.0, 80.0, 9.0], [1.0, 1.0, 5.0, 5.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 2]),
        },
        (64, 64),
    )
    assert empty["labels"].tolist() == [2]  # the box outside the image is empty once clipped


def test_fcos_locations_are_cell_centres(cfg_tiny):
    model = build_detector(d2_cfg(cfg_tiny, "FCOS"), 4).model
    from torchvision.models.detection.image_list import ImageList

    anchors = model.anchor_generator(
        ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)]),
        [torch.zeros(1, 1, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)],
    )[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    torch.testing.assert_close(centres[:2], torch.tensor([[4.0, 4.0], [12.0, 4.0]]))  # x*8 + 8//2, as AdelaiDet
    assert [p.shape for p in model.head.regression_head.scales] == [(1,)] * 5


def test_normalisation_is_per_model_in_the_cache_compatibility(cfg_tiny):
    teacher = d2_cfg(cfg_tiny)  # BGR, MSRA mean/std
    student = cfg_tiny.clone()  # RGB, torchvision mean/std
    levels = [{"name": "p3", "stride": 8, "channels": FPN}]
    cache = {"levels": levels, "preprocessing": preprocessing_identity(teacher)}
    check_compatibility(cache, {"levels": levels, "preprocessing": preprocessing_identity(student)})
    student.merge_from_list(["INPUT.MIN_SIZE_TRAIN", "[48]", "MODEL.SIZE_DIVISIBILITY", "64"])
    with pytest.raises(CacheError) as info:
        check_compatibility(cache, {"levels": levels, "preprocessing": preprocessing_identity(student)})
    assert "preprocessing.min_size_train: cache [64], student [48]" in str(info.value)
    assert "preprocessing.size_divisibility: cache 32, student 64" in str(info.value)


def test_a_detectron2_retinanet_checkpoint_is_an_icd_dump_teacher(cfg_tiny, tmp_path, capsys):
    """The issue's 'done when', at tiny scale: a detectron2-format RetinaNet .pkl runs as `icd dump`'s teacher."""
    cfg = d2_cfg(cfg_tiny)
    k = load_dataset(cfg, "synth_train").num_classes
    weights = write_pkl(tmp_path / "model_final_d2.pkl", d2_state("RetinaNet", k=k))
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS",
            str(weights),
            "CACHE.ENCODING",
            "fp32",
            "CACHE.SHARD_SAMPLES",
            "8",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ]
    )
    config = save_config(cfg, tmp_path / "cfg")
    cache = str(tmp_path / "cache")
    assert dump_cli.main(["--config-file", str(config), "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "detectron2 RetinaNet checkpoint (R-18)" in out and "2 converted" in out
    reader = CacheReader(cache)
    assert reader.committed().all()
    assert {key: reader.attributes["teacher"][key] for key in ("conventions", "input_format", "backend")} == {
        "conventions": "detectron2",
        "input_format": "BGR",
        "backend": "torchvision",
    }
    # what was written is what the converted teacher computes
    teacher = load_teacher(cfg, k, torch.device("cpu"))
    sample = reader.read_sample(0)
    from detection.data.augment import AugmentationPlan, apply_image
    from detection.data.datasets import read_image

    image = next(im for im in load_dataset(cfg, "synth_train").images if im.id == sample.meta.image_id)
    p = AugmentationPlan.from_dict(reader.attributes["augmentation"]).params(
        image.id, sample.meta.variant, image.height, image.width
    )
    (features,) = sample_features(teacher, [apply_image(read_image(image), p)], reader.level_names)
    for level in reader.levels:  # fp32 cache; batches of other sizes round differently (random weights: ~1e4)
        expected = features[level.name].numpy()
        np.testing.assert_allclose(sample.features[level.name], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # ... and it serves a torchvision-convention RGB student: compatible, and its FPN + head initialise it
    student_cfg = cfg_tiny.clone()
    student = build_detector(student_cfg, k + 1)
    check_compatibility(reader.attributes, student_identity(student_cfg, student, student.levels))
    # everything but P6, which the teacher computes from C5 (512 channels) and this student from P5
    assert student.load_fpn_and_head(reader.teacher_weights()) == ["backbone.fpn.extra_blocks.p6.weight"]


@pytest.mark.skipif(HAVE_D2, reason="detectron2 is importable here; this checks the error where it is not")
def test_backend_detectron2_without_detectron2_is_one_clear_error(cfg_tiny, tmp_path, capsys):
    cfg = d2_cfg(
        cfg_tiny,
        BACKEND="detectron2",
        D2_CONFIG="COCO-Detection/retinanet_R_50_FPN_1x.yaml",
        WEIGHTS=str(tmp_path / "w.pkl"),
    )
    config = save_config(cfg, tmp_path / "cfg")
    assert dump_cli.main(["--config-file", str(config), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("icd dump: error: MODEL.BACKEND detectron2, but detectron2 cannot be imported here")
    assert "fix: build detectron2 from source" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # problem + fix
    with pytest.raises(UserError, match="MODEL.BACKEND 'mmdet' is not known"):
        build_detector(d2_cfg(cfg_tiny, BACKEND="mmdet"), 4)


def test_shipped_teacher_configs_build(cfg_tiny):
    from detection.config import setup_cfg

    repo = Path(__file__).resolve().parents[1]
    for name in ("retinanet", "faster_rcnn", "mask_rcnn", "fcos", "condinst", "solov2"):
        cfg = setup_cfg(
            str(repo / "configs" / "Teachers" / f"{name}_R_101_FPN_3x.yaml"),
            ["MODEL.BACKBONE.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "32"],
        )
        assert cfg.MODEL.INPUT_FORMAT == "BGR" and cfg.MODEL.BACKBONE.NORM == "FrozenBN"
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 and cfg.MODEL.PIXEL_STD == [1.0, 1.0, 1.0]
        model = build_detector(cfg, 81)
        # SOLOv2 is the project's own module in AdelaiDet's geometry: no detectron2 conventions apply
        want = "torchvision" if name == "solov2" else "detectron2"
        assert cfg.MODEL.CONVENTIONS == want and model.model.transform.options["conventions"] == want
