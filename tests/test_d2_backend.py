"""With detectron2 importable: parity of converted checkpoints, MODEL.BACKEND detectron2, one cache for both.

Skipped where detectron2 is not importable (it is not on the package registries; build it from source
and put it on PYTHONPATH to run these, see docs/D2_INTEROP.md). Tiny models: R-18, FPN 32, 3 classes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not importable (build it from source: docs/D2_INTEROP.md)")

from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg as d2_get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from test_d2_checkpoint import D2_OPTIONS, FPN, K  # noqa: E402

from cache_format import CacheReader  # noqa: E402
from detection.config import CfgNode  # noqa: E402
from detection.data.datasets import load_dataset  # noqa: E402
from detection.engine.checkpoint import load_weights  # noqa: E402
from detection.modeling.detector import build_detector  # noqa: E402
from stage1_teacher_dump.dump import run_dump  # noqa: E402

BASES = {"RetinaNet": "Base-RetinaNet.yaml", "FasterRCNN": "Base-RCNN-FPN.yaml", "MaskRCNN": "Base-RCNN-FPN.yaml"}
SIZES = [8, 16, 32, 64, 128]


def write_d2_config(tmp_path: Path, arch: str) -> Path:
    """A tiny detectron2 config (R-18, FPN 32) on top of detectron2's own base config."""
    base = model_zoo.get_config_file(BASES[arch])
    anchors = [[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in SIZES] if arch == "RetinaNet" else [[s] for s in SIZES]
    text = (
        f"_BASE_: {base}\nMODEL:\n  MASK_ON: {arch == 'MaskRCNN'}\n  RESNETS:\n    DEPTH: 18\n"
        f"    RES2_OUT_CHANNELS: 64\n  FPN:\n    OUT_CHANNELS: {FPN}\n  ANCHOR_GENERATOR:\n    SIZES: {anchors}\n"
        f"  ROI_MASK_HEAD:\n    CONV_DIM: {FPN}\n"
    )  # the project's mask head is as wide as its FPN
    path = tmp_path / f"d2_{arch}.yaml"
    path.write_text(text)
    return path


def d2_model(path: Path, seed: int = 0, k: int = K) -> torch.nn.Module:
    d2cfg = d2_get_cfg()
    d2cfg.merge_from_file(str(path))
    d2cfg.MODEL.DEVICE = "cpu"
    d2cfg.MODEL.RETINANET.NUM_CLASSES = d2cfg.MODEL.ROI_HEADS.NUM_CLASSES = k
    return build_detecting(d2cfg, seed, ("cls_score.bias", "objectness_logits.bias"))


def build_detecting(d2cfg: Any, seed: int, prior_biases: tuple[str, ...]) -> torch.nn.Module:
    """detectron2's build_model, seeded, with the class-prior biases `prior_biases` redrawn around -1 so
    that the untrained model detects something."""
    torch.manual_seed(seed)
    model = build_model(d2cfg).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(prior_biases):
                tensor.normal_(-1.0, 1.0)
    return model


def project_cfg(cfg_tiny: CfgNode, arch: str, **model) -> CfgNode:
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


def save_pkl(model: torch.nn.Module, path: Path) -> Path:
    with open(path, "wb") as handle:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "tests"}, handle)
    return path


@pytest.mark.parametrize("arch", ["RetinaNet", "FasterRCNN", "MaskRCNN"])
def test_converted_checkpoint_computes_detectrons_function(cfg_tiny, tmp_path, arch):
    reference = d2_model(write_d2_config(tmp_path, arch))
    ours = build_detector(project_cfg(cfg_tiny, arch), K + 1).eval()
    load_weights(ours, save_pkl(reference, tmp_path / "m.pkl"))
    g = torch.Generator().manual_seed(1)
    rgb = [(torch.rand(3, 96, 128, generator=g) * 255).round(), (torch.rand(3, 64, 80, generator=g) * 255).round()]
    bgr = [image.flip(0) for image in rgb]
    with torch.no_grad():
        expected = reference.backbone(reference.preprocess_image([{"image": i} for i in bgr]).tensor)
        got = ours.features(ours.preprocess(rgb).tensors)
        d2_out = reference([{"image": i, "height": i.shape[1], "width": i.shape[2]} for i in bgr])
        our_out, _, _ = ours(rgb)
    for level in ours.levels:
        torch.testing.assert_close(got[level], expected[level], rtol=0, atol=1e-6 * float(expected[level].abs().max()))
    for mine, theirs in zip(our_out, d2_out):
        inst = theirs["instances"]
        assert len(mine["boxes"]) == len(inst) > 0
        torch.testing.assert_close(mine["boxes"], inst.pred_boxes.tensor, rtol=0, atol=1e-3)
        torch.testing.assert_close(mine["scores"], inst.scores, rtol=0, atol=1e-5)
        assert torch.equal(mine["labels"], inst.pred_classes + 1)
        if arch == "MaskRCNN":
            assert torch.equal(mine["masks"][:, 0] >= 0.5, inst.pred_masks)


@pytest.mark.parametrize("arch", ["RetinaNet", "MaskRCNN"])
def test_backend_detectron2_keeps_the_adapter_contract(cfg_tiny, tmp_path, arch):
    cfg = project_cfg(cfg_tiny, arch, BACKEND="detectron2", D2_CONFIG=str(write_d2_config(tmp_path, arch)))
    torch.manual_seed(0)
    model = build_detector(cfg, K + 1)
    assert model.levels == (["p3", "p4", "p5", "p6", "p7"] if arch == "RetinaNet" else ["p2", "p3", "p4", "p5", "p6"])
    images = [torch.rand(3, 64, 96) * 255, torch.rand(3, 64, 80) * 255]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]),
            "labels": torch.tensor([K]),
            "masks": torch.zeros(1, 64, 96, dtype=torch.uint8),
        },
        {
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.ones(1, 64, 80, dtype=torch.uint8),
        },
    ]
    losses, features, image_list = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and len(losses) >= 2
    assert image_list.tensors.shape == (2, 3, 64, 96) and image_list.image_sizes == [(64, 96), (64, 80)]
    assert {k: v.shape[-1] for k, v in features.items()} == {lv: -(-96 // model.strides[lv]) for lv in model.levels}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        detections, _, _ = model(images)
    assert all(((d["labels"] >= 1) & (d["labels"] <= K)).all() for d in detections)
    # FPN + head under the torchvision backend's names: a torchvision student takes them, and back
    torchvision_twin = build_detector(project_cfg(cfg_tiny, arch), K + 1)
    assert torchvision_twin.load_fpn_and_head(model.fpn_and_head_state_dict()) == []
    assert model.load_fpn_and_head(torchvision_twin.fpn_and_head_state_dict()) == []


def test_one_cache_whichever_backend_dumped_it(cfg_tiny, tmp_path):
    """A detectron2-built teacher and the converted torchvision one write the same cache."""
    d2_config = write_d2_config(tmp_path, "RetinaNet")
    k = load_dataset(cfg_tiny, "synth_train").num_classes
    weights = save_pkl(d2_model(d2_config, k=k), tmp_path / "teacher.pkl")
    caches = {}
    for backend in ("detectron2", "torchvision"):
        cfg = project_cfg(cfg_tiny, "RetinaNet", BACKEND=backend, D2_CONFIG=str(d2_config), WEIGHTS=str(weights))
        cfg.merge_from_list(["CACHE.ENCODING", "fp32", "CACHE.SHARD_SAMPLES", "8"])
        caches[backend] = str(tmp_path / f"cache_{backend}")
        run_dump(cfg, caches[backend])
    a, b = CacheReader(caches["detectron2"]), CacheReader(caches["torchvision"])
    assert a.attributes["teacher"]["backend"] == "detectron2" and b.attributes["teacher"]["backend"] == "torchvision"
    assert a.attributes["preprocessing"] == b.attributes["preprocessing"]
    for i in range(a.num_samples):
        x, y = a.read_sample(i), b.read_sample(i)
        for level in a.level_names:
            np.testing.assert_array_equal(x.features[level], y.features[level])
    weights_a, weights_b = a.teacher_weights(), b.teacher_weights()
    assert sorted(weights_a) == sorted(weights_b)
    for key in weights_a:
        np.testing.assert_array_equal(weights_a[key], weights_b[key])
