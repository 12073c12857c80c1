"""With AdelaiDet importable: its FCOS, CondInst and SOLOv2 checkpoints compute AdelaiDet's function here.

Skipped where AdelaiDet (and detectron2) are not importable: neither is on the package registries; both
build from a source checkout (docs/D2_INTEROP.md), the checkout on PYTHONPATH (AdelaiDet's configs are
read from it). AdelaiDet builds each model from its own config (tiny: R-18, FPN 64, 3 classes) with a
seeded random initialisation; its state dict, saved as AdelaiDet saves it, is loaded through
MODEL.WEIGHTS into the project's model, and both run on the same images.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not importable (build it from source: docs/D2_INTEROP.md)")
adet = pytest.importorskip("adet", reason="AdelaiDet is not importable (build it from source: docs/D2_INTEROP.md)")

import adet.modeling  # noqa: E402,F401,F811  (registers AdelaiDet's meta-architectures)
from adet.config import get_cfg as adet_get_cfg  # noqa: E402
from test_d2_backend import build_detecting  # noqa: E402
from test_d2_checkpoint import D2_OPTIONS  # noqa: E402

from detection.config import CfgNode  # noqa: E402
from detection.engine.checkpoint import load_weights  # noqa: E402
from detection.modeling.detector import build_detector  # noqa: E402

K = 3
WIDTH = 64  # every GroupNorm layer >= 64 channels: 32 groups here as in AdelaiDet
CONFIGS = {
    "FCOS": "FCOS-Detection/R_50_1x.yaml",
    "CondInst": "CondInst/MS_R_50_1x.yaml",
    "SOLOv2": "SOLOv2/R50_3x.yaml",
}


def adelaidet_model(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg = adet_get_cfg()
    config = Path(adet.__file__).resolve().parents[1] / "configs" / CONFIGS[arch]
    if not config.is_file():
        pytest.skip(f"AdelaiDet is importable but {config} is not beside it (use a source checkout)")
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.WEIGHTS",
            "",
            "MODEL.RESNETS.DEPTH",
            18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            64,
            "MODEL.FPN.OUT_CHANNELS",
            WIDTH,
            "MODEL.FCOS.NUM_CLASSES",
            K,
            "MODEL.SOLOV2.NUM_CLASSES",
            K,
            "MODEL.SOLOV2.INSTANCE_IN_CHANNELS",
            WIDTH,
            "MODEL.SOLOV2.INSTANCE_CHANNELS",
            WIDTH,
            "MODEL.SOLOV2.MASK_IN_CHANNELS",
            WIDTH,
            "MODEL.SOLOV2.MASK_CHANNELS",
            WIDTH,
            "MODEL.SOLOV2.NUM_KERNELS",
            WIDTH,
            "MODEL.SOLOV2.NUM_MASKS",
            WIDTH,
            "MODEL.CONDINST.MASK_BRANCH.CHANNELS",
            WIDTH,
        ]
    )
    return build_detecting(cfg, seed, ("cls_logits.bias", "cate_pred.bias"))


def project_model(cfg_tiny: CfgNode, arch: str) -> torch.nn.Module:
    cfg = cfg_tiny.clone()
    options = {
        **D2_OPTIONS,
        "FPN": {"OUT_CHANNELS": WIDTH, "TOP_BLOCK_IN": "p5"},
        "SCORE_THRESH_TEST": 0.05,
        "NMS_THRESH_TEST": 0.6,
        "CONDINST": {"MASK_BRANCH": {"CHANNELS": WIDTH}},
    }
    if arch == "SOLOv2":  # AdelaiDet's geometry already: no detectron2 conventions, P6 max-pooled
        options.pop("CONVENTIONS")
        options.update(
            FPN={"OUT_CHANNELS": WIDTH},
            SCORE_THRESH_TEST=0.1,
            SOLOV2={"INSTANCE_CHANNELS": WIDTH, "MASK_CHANNELS": WIDTH, "NUM_MASKS": WIDTH},
        )
    cfg.merge_from_dict(
        {
            "MODEL": {"META_ARCHITECTURE": arch, "MASK_ON": arch != "FCOS", **options},
            "TEST": {"DETECTIONS_PER_IMAGE": 100},
        },
        source="test",
    )
    return build_detector(cfg, K + 1).eval()


@pytest.mark.parametrize("arch", ["FCOS", "CondInst", "SOLOv2"])
def test_adelaidet_checkpoint_computes_adelaidets_function(cfg_tiny, tmp_path, arch):
    reference = adelaidet_model(arch)
    path = tmp_path / "model_final.pth"
    torch.save({"model": reference.state_dict(), "iteration": 1}, path)  # an AdelaiDet training checkpoint
    ours = project_model(cfg_tiny, arch)
    load_weights(ours, path)
    g = torch.Generator().manual_seed(1)
    rgb = [(torch.rand(3, 128, 160, generator=g) * 255).round(), (torch.rand(3, 96, 128, generator=g) * 255).round()]
    for image in rgb:  # one image per call: AdelaiDet's CondInst infers one image size per batch
        bgr = image.flip(0)
        with torch.no_grad():
            theirs = reference([{"image": bgr, "height": bgr.shape[1], "width": bgr.shape[2]}])[0]["instances"]
            mine = ours([image])[0][0]
        assert len(mine["scores"]) == len(theirs) > 0
        assert torch.equal(mine["labels"], theirs.pred_classes + 1)
        torch.testing.assert_close(mine["scores"], theirs.scores, rtol=0, atol=1e-3)
        if arch != "SOLOv2":  # AdelaiDet's SOLOv2 boxes are zeros
            torch.testing.assert_close(mine["boxes"], theirs.pred_boxes.tensor, rtol=0, atol=1e-2)
        if arch != "FCOS":
            a, b = mine["masks"][:, 0] >= 0.5, theirs.pred_masks.bool()
            union = (a | b).flatten(1).sum(1)
            iou = torch.where(union > 0, (a & b).flatten(1).sum(1) / union.clamp_min(1), 1.0)  # both empty: same
            assert iou.min() >= 0.99 and b.any()


def test_backend_detectron2_builds_adelaidets_fcos(cfg_tiny, tmp_path):
    """MODEL.BACKEND detectron2 with an AdelaiDet config: AdelaiDet builds FCOS behind the same adapter."""
    base = Path(adet.__file__).resolve().parents[1] / "configs" / CONFIGS["FCOS"]
    if not base.is_file():
        pytest.skip(f"AdelaiDet is importable but {base} is not beside it (use a source checkout)")
    config = tmp_path / "fcos_tiny.yaml"
    config.write_text(
        f"_BASE_: {base}\nMODEL:\n  WEIGHTS: ''\n  RESNETS:\n    DEPTH: 18\n    RES2_OUT_CHANNELS: 64\n"
        f"  FPN:\n    OUT_CHANNELS: {WIDTH}\n"
    )
    cfg = cfg_tiny.clone()
    cfg.merge_from_dict(
        {
            "MODEL": {
                "META_ARCHITECTURE": "FCOS",
                **D2_OPTIONS,
                "BACKEND": "detectron2",
                "D2_CONFIG": str(config),
                "FPN": {"OUT_CHANNELS": WIDTH, "TOP_BLOCK_IN": "p5"},
            }
        },
        source="test",
    )
    torch.manual_seed(0)
    model = build_detector(cfg, K + 1)
    assert model.levels == ["p3", "p4", "p5", "p6", "p7"]
    images = [torch.rand(3, 64, 96) * 255, torch.rand(3, 64, 80) * 255]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([K])},
        {"boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0]]), "labels": torch.tensor([1])},
    ]
    losses, features, _ = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and len(losses) >= 3
    assert list(features) == model.levels
    sum(losses.values()).backward()
    with torch.no_grad():
        detections, _, _ = model.eval()(images)
    assert all(((d["labels"] >= 1) & (d["labels"] <= K)).all() for d in detections)
    # FPN + head under the torchvision backend's names: an AdelaiDet-conventions FCOS takes them, and back
    twin_cfg = cfg.clone()
    twin_cfg.MODEL.BACKEND = "torchvision"
    twin = build_detector(twin_cfg, K + 1)
    assert twin.load_fpn_and_head(model.fpn_and_head_state_dict()) == []
    assert model.load_fpn_and_head(twin.fpn_and_head_state_dict()) == []
