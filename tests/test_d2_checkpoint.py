"""detectron2 / AdelaiDet checkpoints on the torchvision backend, without detectron2.

The checkpoints are written here in detectron2's (and AdelaiDet's) key names and shapes, enumerated
from detectron2's module structure independently of detection.interop.d2_checkpoint's name map, at tiny
scale (R-18, FPN 32, 3 classes).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detection.config import CfgNode
from detection.engine.checkpoint import load_weights
from detection.errors import UserError
from detection.modeling.detector import build_detector

K = 3  # foreground classes
FPN = 32
D2_OPTIONS = {
    "CONVENTIONS": "detectron2",
    "INPUT_FORMAT": "BGR",
    "PIXEL_MEAN": [103.53, 116.28, 123.675],
    "PIXEL_STD": [1.0, 1.0, 1.0],
    "RESNETS": {"STRIDE_IN_1X1": True},
    "BACKBONE": {"NORM": "FrozenBN", "DEPTH": 18},
}


SOLO = {"INSTANCE_CHANNELS": 64, "NUM_INSTANCE_CONVS": 2, "MASK_CHANNELS": 32, "NUM_MASKS": 32}


def d2_state(
    arch: str,
    depth: int = 18,
    fpn: int = FPN,
    k: int = K,
    p6_from: str = "res5",
    seed: int = 0,
    sizes_of_interest: tuple[int, ...] = (64, 128, 256, 512, 1024),
) -> dict[str, np.ndarray]:
    """A randomly filled state dict named and shaped as detectron2 (AdelaiDet for FCOS) names it."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}

    def put(name: str, *shape: int, scale: float = 0.05) -> None:
        state[name] = (rng.standard_normal(shape) * scale).astype(np.float32)

    def conv(name: str, out: int, inp: int, size: int, bias: bool = False) -> None:
        put(f"{name}.weight", out, inp, size, size)
        if bias:
            put(f"{name}.bias", out)

    def norm(name: str, channels: int) -> None:
        state[f"{name}.weight"] = (0.5 + rng.random(channels)).astype(np.float32)
        put(f"{name}.bias", channels)
        put(f"{name}.running_mean", channels)
        state[f"{name}.running_var"] = (0.5 + rng.random(channels)).astype(np.float32)

    bottom = "backbone.bottom_up"
    conv(f"{bottom}.stem.conv1", 64, 3, 7)
    norm(f"{bottom}.stem.conv1.norm", 64)
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    widths, inp = [64, 128, 256, 512], 64
    for stage, (count, width) in enumerate(zip(blocks, widths), start=2):
        for b in range(count):
            prefix, cin = f"{bottom}.res{stage}.{b}", inp if b == 0 else width
            conv(f"{prefix}.conv1", width, cin, 3)
            norm(f"{prefix}.conv1.norm", width)
            conv(f"{prefix}.conv2", width, width, 3)
            norm(f"{prefix}.conv2.norm", width)
            if b == 0 and cin != width:
                conv(f"{prefix}.shortcut", width, cin, 1)
                norm(f"{prefix}.shortcut.norm", width)
        inp = width
    two_stage = arch in ("FasterRCNN", "MaskRCNN")
    from_res2 = two_stage or arch == "SOLOv2"
    for level in [2, 3, 4, 5] if from_res2 else [3, 4, 5]:
        conv(f"backbone.fpn_lateral{level}", fpn, widths[level - 2], 1, bias=True)
        conv(f"backbone.fpn_output{level}", fpn, fpn, 3, bias=True)
    if not from_res2:  # SOLOv2's P6 is max-pooled P5, without parameters
        conv("backbone.top_block.p6", fpn, 512 if p6_from == "res5" else fpn, 3, bias=True)
        conv("backbone.top_block.p7", fpn, fpn, 3, bias=True)
    if arch == "RetinaNet":
        for branch in ("cls_subnet", "bbox_subnet"):
            for i in range(4):
                conv(f"head.{branch}.{2 * i}", fpn, fpn, 3, bias=True)
        conv("head.cls_score", 9 * k, fpn, 3, bias=True)
        conv("head.bbox_pred", 9 * 4, fpn, 3, bias=True)
    if two_stage:
        conv("proposal_generator.rpn_head.conv", fpn, fpn, 3, bias=True)
        conv("proposal_generator.rpn_head.objectness_logits", 3, fpn, 1, bias=True)
        conv("proposal_generator.rpn_head.anchor_deltas", 12, fpn, 1, bias=True)
        put("roi_heads.box_head.fc1.weight", 1024, fpn * 49)
        put("roi_heads.box_head.fc1.bias", 1024)
        put("roi_heads.box_head.fc2.weight", 1024, 1024)
        put("roi_heads.box_head.fc2.bias", 1024)
        put("roi_heads.box_predictor.cls_score.weight", k + 1, 1024)
        put("roi_heads.box_predictor.cls_score.bias", k + 1)
        put("roi_heads.box_predictor.bbox_pred.weight", 4 * k, 1024)
        put("roi_heads.box_predictor.bbox_pred.bias", 4 * k)
    if arch == "MaskRCNN":
        for i in range(1, 5):
            conv(f"roi_heads.mask_head.mask_fcn{i}", fpn, fpn, 3, bias=True)
        put("roi_heads.mask_head.deconv.weight", fpn, fpn, 2, 2)  # ConvTranspose2d: [in, out, kh, kw]
        put("roi_heads.mask_head.deconv.bias", fpn)
        conv("roi_heads.mask_head.predictor", k, fpn, 1, bias=True)
    if arch == "FCOS":
        head = "proposal_generator.fcos_head"
        for branch in ("cls_tower", "bbox_tower"):
            for i in range(4):  # conv, GroupNorm, ReLU
                conv(f"{head}.{branch}.{3 * i}", fpn, fpn, 3, bias=True)
                put(f"{head}.{branch}.{3 * i + 1}.weight", fpn)
                put(f"{head}.{branch}.{3 * i + 1}.bias", fpn)
        conv(f"{head}.cls_logits", k, fpn, 3, bias=True)
        conv(f"{head}.bbox_pred", 4, fpn, 3, bias=True)
        conv(f"{head}.ctrness", 1, fpn, 3, bias=True)
        for level in range(5):
            state[f"{head}.scales.{level}.scale"] = np.array([1.0 + 0.1 * level], np.float32)
    if arch == "CondInst":  # AdelaiDet's CondInst = its FCOS + a controller, a mask branch, two buffers
        state.update(d2_state("FCOS", depth, fpn, k, "p5", seed))
        conv("controller", 169, fpn, 3, bias=True)  # (8 + 2) * 8 + 8 * 8 + 8 weights, 8 + 8 + 1 biases
        for i in range(3):  # conv (no bias under BN), BatchNorm, ReLU
            conv(f"mask_branch.refine.{i}.0", 128, fpn, 3)
            norm(f"mask_branch.refine.{i}.1", 128)
        for j in range(4):
            conv(f"mask_branch.tower.{j}.0", 128, 128, 3)
            norm(f"mask_branch.tower.{j}.1", 128)
        conv("mask_branch.tower.4", 8, 128, 1, bias=True)
        conv("mask_branch.seg_head.0.0", 128, fpn, 3)  # a `_sem` config's training-only semantic branch
        conv("mask_branch.logits", k, 128, 1, bias=True)
        state["mask_head._iter"] = np.zeros(1, np.float32)
        state["mask_head.sizes_of_interest"] = np.array(sizes_of_interest, np.float32)
    if arch == "SOLOv2":  # AdelaiDet's SOLOv2InsHead / SOLOv2MaskHead with NORM GN, coordinates in the kernel branch
        for branch in ("cate_tower", "kernel_tower"):
            for i in range(SOLO["NUM_INSTANCE_CONVS"]):  # conv (no bias under GN), GroupNorm, ReLU
                inp = (fpn + 2 if branch == "kernel_tower" else fpn) if i == 0 else SOLO["INSTANCE_CHANNELS"]
                conv(f"ins_head.{branch}.{3 * i}", SOLO["INSTANCE_CHANNELS"], inp, 3)
                put(f"ins_head.{branch}.{3 * i + 1}.weight", SOLO["INSTANCE_CHANNELS"])
                put(f"ins_head.{branch}.{3 * i + 1}.bias", SOLO["INSTANCE_CHANNELS"])
        conv("ins_head.cate_pred", k, SOLO["INSTANCE_CHANNELS"], 3, bias=True)
        conv("ins_head.kernel_pred", SOLO["NUM_MASKS"], SOLO["INSTANCE_CHANNELS"], 3, bias=True)
        mask = SOLO["MASK_CHANNELS"]
        for level in range(4):
            for j in range(max(level, 1)):
                inp = (fpn + 2 if level == 3 else fpn) if j == 0 else mask
                conv(f"mask_head.convs_all_levels.{level}.conv{j}.0", mask, inp, 3)
                put(f"mask_head.convs_all_levels.{level}.conv{j}.1.weight", mask)
                put(f"mask_head.convs_all_levels.{level}.conv{j}.1.bias", mask)
        conv("mask_head.conv_pred.0", SOLO["NUM_MASKS"], mask, 1)
        put("mask_head.conv_pred.1.weight", SOLO["NUM_MASKS"])
        put("mask_head.conv_pred.1.bias", SOLO["NUM_MASKS"])
    return state


def write_pkl(path: Path, state: dict[str, np.ndarray], **extra) -> Path:
    with open(path, "wb") as handle:
        pickle.dump({"model": state, "__author__": "tests", **extra}, handle)
    return path


def model_cfg(cfg_tiny: CfgNode, arch: str, **model) -> CfgNode:
    cfg = cfg_tiny.clone()
    options = dict(D2_OPTIONS)
    if arch == "SOLOv2":  # the project's own module, in AdelaiDet's geometry: no detectron2 conventions
        options.pop("CONVENTIONS")
        options["SOLOV2"] = dict(SOLO)
    cfg.merge_from_dict(
        {
            "MODEL": {
                "META_ARCHITECTURE": arch,
                "MASK_ON": arch in ("MaskRCNN", "CondInst", "SOLOv2"),
                **options,
                **model,
            }
        },
        source="test",
    )
    return cfg


def build(cfg: CfgNode) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(cfg, K + 1).eval()


@pytest.mark.parametrize("arch", ["RetinaNet", "FasterRCNN", "MaskRCNN", "FCOS", "CondInst", "SOLOv2"])
def test_every_tensor_lands_where_detectron2_uses_it(cfg_tiny, tmp_path, capsys, arch):
    top = "res5" if arch == "RetinaNet" else "p5"
    state = d2_state(arch, p6_from=top)
    model = build(model_cfg(cfg_tiny, arch, FPN={"OUT_CHANNELS": FPN, "TOP_BLOCK_IN": top}))
    load_weights(model, write_pkl(tmp_path / "m.pkl", state))
    out = capsys.readouterr().out
    kind = {
        "FasterRCNN": "Faster R-CNN",
        "MaskRCNN": "Mask R-CNN",
        "FCOS": "FCOS (AdelaiDet)",
        "CondInst": "CondInst (AdelaiDet)",
        "SOLOv2": "SOLOv2 (AdelaiDet)",
    }.get(arch, arch)
    assert f"detectron2 {kind} checkpoint (R-18)" in out
    own = model.state_dict()

    def same(ours: str, theirs: str) -> None:
        np.testing.assert_array_equal(own[f"model.{ours}"].numpy(), state[theirs])

    same("backbone.body.conv1.weight", "backbone.bottom_up.stem.conv1.weight")
    same("backbone.body.bn1.running_var", "backbone.bottom_up.stem.conv1.norm.running_var")
    same("backbone.body.layer2.0.conv1.weight", "backbone.bottom_up.res3.0.conv1.weight")
    same("backbone.body.layer4.1.bn2.bias", "backbone.bottom_up.res5.1.conv2.norm.bias")
    same("backbone.body.layer3.0.downsample.0.weight", "backbone.bottom_up.res4.0.shortcut.weight")
    same("backbone.body.layer3.0.downsample.1.weight", "backbone.bottom_up.res4.0.shortcut.norm.weight")
    first = 2 if arch in ("FasterRCNN", "MaskRCNN", "SOLOv2") else 3
    same("backbone.fpn.inner_blocks.0.0.weight", f"backbone.fpn_lateral{first}.weight")
    same("backbone.fpn.layer_blocks.2.0.bias", f"backbone.fpn_output{first + 2}.bias")
    if arch == "RetinaNet":
        same("backbone.fpn.extra_blocks.p6.weight", "backbone.top_block.p6.weight")
        same("head.classification_head.conv.3.0.weight", "head.cls_subnet.6.weight")
        same("head.regression_head.bbox_reg.weight", "head.bbox_pred.weight")
        logits = own["model.head.classification_head.cls_logits.bias"].reshape(9, K + 1)
        assert (logits[:, 0] < -1000).all()  # background: never scores
        np.testing.assert_array_equal(logits[:, 1:].numpy(), state["head.cls_score.bias"].reshape(9, K))
    if arch in ("FasterRCNN", "MaskRCNN"):
        same("rpn.head.conv.0.0.weight", "proposal_generator.rpn_head.conv.weight")
        same("rpn.head.bbox_pred.bias", "proposal_generator.rpn_head.anchor_deltas.bias")
        same("roi_heads.box_head.fc7.weight", "roi_heads.box_head.fc2.weight")
        cls = own["model.roi_heads.box_predictor.cls_score.weight"].numpy()
        d2_cls = state["roi_heads.box_predictor.cls_score.weight"]
        np.testing.assert_array_equal(cls[0], d2_cls[K])  # background first here, last in detectron2
        np.testing.assert_array_equal(cls[1:], d2_cls[:K])
        deltas = own["model.roi_heads.box_predictor.bbox_pred.weight"].numpy()
        assert not deltas[:4].any()
        np.testing.assert_array_equal(deltas[4:], state["roi_heads.box_predictor.bbox_pred.weight"])
    if arch == "MaskRCNN":
        same("roi_heads.mask_head.3.0.weight", "roi_heads.mask_head.mask_fcn4.weight")
        same("roi_heads.mask_predictor.conv5_mask.weight", "roi_heads.mask_head.deconv.weight")
        logits = own["model.roi_heads.mask_predictor.mask_fcn_logits.weight"].numpy()
        np.testing.assert_array_equal(logits[1:], state["roi_heads.mask_head.predictor.weight"])
    if arch == "CondInst":
        for name in ("controller.weight", "mask_branch.refine.2.1.running_var", "mask_branch.tower.4.bias"):
            same(name, name)
        assert "skipped mask_head._iter" in out and "checked mask_head.sizes_of_interest" in out
        assert "skipped mask_branch.logits.weight (AdelaiDet's training-only semantic-loss branch" in out
    if arch in ("FCOS", "CondInst"):
        head = "proposal_generator.fcos_head"
        same("head.classification_head.conv.4.weight", f"{head}.cls_tower.4.weight")  # a GroupNorm
        same("head.regression_head.bbox_ctrness.weight", f"{head}.ctrness.weight")
        same("head.regression_head.scales.3", f"{head}.scales.3.scale")
    if arch == "SOLOv2":
        for name in (
            "ins_head.cate_tower.3.weight",
            "ins_head.kernel_tower.4.bias",
            "ins_head.cate_pred.bias",
            "mask_head.convs_all_levels.3.conv2.1.weight",
            "mask_head.conv_pred.0.weight",
        ):
            same(name, name)
        assert len(own) - sum(k.endswith("num_batches_tracked") for k in own) == len(state)


def test_retinanet_head_computes_detectrons_class_layout(cfg_tiny, tmp_path):
    """Project logits for label c+1 == detectron2's cls_score for class c, read in detectron2's [A, K] layout."""
    state = d2_state("RetinaNet")
    model = build(model_cfg(cfg_tiny, "RetinaNet", FPN={"OUT_CHANNELS": FPN}))
    load_weights(model, write_pkl(tmp_path / "m.pkl", state))
    feature = torch.randn(1, FPN, 5, 6)
    head = model.model.head.classification_head
    with torch.no_grad():
        ours = head([feature])  # [1, HWA, K+1]
        tower = head.conv(feature)
        d2 = F.conv2d(
            tower,
            torch.from_numpy(state["head.cls_score.weight"]),
            torch.from_numpy(state["head.cls_score.bias"]),
            padding=1,
        )  # [1, A*K, H, W]
        d2 = d2.view(1, 9, K, 5, 6).permute(0, 3, 4, 1, 2).reshape(1, -1, K)  # detectron2's N, HWA, K
    # two convolutions of different output widths: equal up to float32 rounding, scaled to the logits
    torch.testing.assert_close(ours[..., 1:], d2, rtol=0, atol=1e-5 * float(d2.abs().max()))
    assert (torch.sigmoid(ours[..., 0]) == 0).all()


def test_training_pth_and_caffe2_backbone_formats(cfg_tiny, tmp_path, capsys):
    state = d2_state("RetinaNet")
    torch.save(
        {
            "model": {k: torch.from_numpy(v) for k, v in state.items()},
            "iteration": 270000,
            "optimizer": {"state": {}, "param_groups": []},
        },
        tmp_path / "model_final.pth",
    )
    model = build(model_cfg(cfg_tiny, "RetinaNet", FPN={"OUT_CHANNELS": FPN}))
    load_weights(model, tmp_path / "model_final.pth")
    assert "detectron2 RetinaNet checkpoint (R-18)" in capsys.readouterr().out
    # Detectron's ImageNet backbones: Caffe2 names under "blobs", no BN statistics
    blobs = {
        "conv1_w": state["backbone.bottom_up.stem.conv1.weight"],
        "fc1000_w": np.zeros((10, 512), np.float32),
        "res_conv1_bn_s": state["backbone.bottom_up.stem.conv1.norm.weight"],
        "res_conv1_bn_b": state["backbone.bottom_up.stem.conv1.norm.bias"],
        "conv1_w_momentum": np.zeros(1, np.float32),
    }
    for key, value in state.items():
        parts = key.split(".")
        if parts[2].startswith("res") and not key.endswith(("running_mean", "running_var")):
            stage, block, layer = parts[2][3], parts[3], parts[4]
            branch = {"conv1": "2a", "conv2": "2b", "conv3": "2c", "shortcut": "1"}[layer]
            leaf = (
                {"weight": "w"}.get(parts[-1]) if parts[5] != "norm" else {"weight": "bn_s", "bias": "bn_b"}[parts[-1]]
            )
            blobs[f"res{stage}_{block}_branch{branch}_{leaf}"] = value
    with open(tmp_path / "R-18.pkl", "wb") as handle:
        pickle.dump({"blobs": blobs}, handle)
    student = build(model_cfg(cfg_tiny, "FCOS", CONVENTIONS="torchvision", FPN={"OUT_CHANNELS": FPN}))
    fpn_before = student.state_dict()["model.backbone.fpn.inner_blocks.0.0.weight"].clone()
    load_weights(student, tmp_path / "R-18.pkl")
    out = capsys.readouterr().out
    assert "ImageNet backbone" in out and "keep their initialisation" in out and "fc1000_w" in out
    own = student.state_dict()
    np.testing.assert_array_equal(
        own["model.backbone.body.layer3.1.conv2.weight"].numpy(), state["backbone.bottom_up.res4.1.conv2.weight"]
    )
    assert torch.equal(own["model.backbone.body.layer1.0.bn1.running_var"], torch.ones(64))  # as detectron2 fills in
    assert torch.equal(own["model.backbone.fpn.inner_blocks.0.0.weight"], fpn_before)


@pytest.mark.parametrize(
    "case, model_changes, state_kwargs, message",
    [
        (
            "architecture",
            {"META_ARCHITECTURE": "FasterRCNN"},
            {},
            "is a detectron2 RetinaNet checkpoint, but the config builds FasterRCNN",
        ),
        ("conventions", {"CONVENTIONS": "torchvision"}, {}, "built with torchvision's conventions"),
        ("depth", {}, {"depth": 34}, "ResNet depth: checkpoint R-34, model R-18"),
        ("classes", {}, {"k": 5}, "classes: checkpoint 5, model 3"),
        ("p6", {"FPN": {"OUT_CHANNELS": FPN, "TOP_BLOCK_IN": "p5"}}, {}, "set MODEL.FPN.TOP_BLOCK_IN res5"),
        ("width", {"FPN": {"OUT_CHANNELS": 64}}, {}, "backbone.fpn_lateral3.weight: checkpoint (32, 128, 1, 1)"),
    ],
)
def test_another_architecture_is_refused_and_nothing_is_loaded(
    cfg_tiny, tmp_path, case, model_changes, state_kwargs, message
):
    state = d2_state("RetinaNet", **state_kwargs)
    changes = {"FPN": {"OUT_CHANNELS": FPN}, **model_changes}
    arch = changes.pop("META_ARCHITECTURE", "RetinaNet")
    model = build(model_cfg(cfg_tiny, arch, **changes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_weights(model, write_pkl(tmp_path / "m.pkl", state))
    assert message in str(info.value) and "nothing was loaded" in str(info.value) and info.value.fix
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "ckpt_arch, arch, state_kwargs, message",
    [
        ("SOLOv2", "SOLOv2", {"k": 5}, "classes: checkpoint 5, model 3"),
        ("SOLOv2", "SOLOv2", {"depth": 34}, "ResNet depth: checkpoint R-34, model R-18"),
        ("SOLOv2", "MaskRCNN", {}, "is a detectron2 SOLOv2 (AdelaiDet) checkpoint, but the config builds MaskRCNN"),
        ("CondInst", "FCOS", {}, "is a detectron2 CondInst (AdelaiDet) checkpoint, but the config builds FCOS"),
        ("CondInst", "CondInst", {"sizes_of_interest": (32, 64, 128, 256, 512)}, "scales relative coordinates by"),
    ],
)
def test_adelaidet_instance_checkpoints_load_whole_or_not_at_all(
    cfg_tiny, tmp_path, ckpt_arch, arch, state_kwargs, message
):
    state = d2_state(ckpt_arch, **state_kwargs)
    top = "p5" if arch in ("FCOS", "CondInst") else ""
    model = build(model_cfg(cfg_tiny, arch, FPN={"OUT_CHANNELS": FPN, "TOP_BLOCK_IN": top}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_weights(model, write_pkl(tmp_path / "m.pkl", state))
    assert message in str(info.value) and "nothing was loaded" in str(info.value) and info.value.fix
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recorded_pixel_statistics_and_anchors_are_checked(cfg_tiny, tmp_path, capsys):
    state = d2_state("RetinaNet")
    model = build(model_cfg(cfg_tiny, "RetinaNet", FPN={"OUT_CHANNELS": FPN}))
    anchors = model.model.anchor_generator
    state["anchor_generator.cell_anchors.0"] = anchors.cell_anchors_0.numpy()
    state["pixel_mean"] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    load_weights(model, write_pkl(tmp_path / "ok.pkl", state))
    assert "checked pixel_mean = config" in capsys.readouterr().out
    state["pixel_mean"] = np.array([123.675, 116.28, 103.53], np.float32).reshape(3, 1, 1)  # an RGB model
    state["anchor_generator.cell_anchors.0"] = np.round(anchors.cell_anchors_0.numpy())  # torchvision-style
    with pytest.raises(UserError) as info:
        load_weights(model, write_pkl(tmp_path / "bad.pkl", state))
    assert "pixel_mean: the checkpoint was trained with [123.675" in str(info.value)
    assert "cell anchors differ" in str(info.value)


def test_a_pickle_that_wants_code_is_refused_without_running_it(cfg_tiny, tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"model": {"backbone.bottom_up.stem.conv1.weight": Evil()}, "__author__": "x"}, handle)
    model = build(model_cfg(cfg_tiny, "RetinaNet", FPN={"OUT_CHANNELS": FPN}))
    with pytest.raises(UserError, match="cannot read .* as a detectron2 .pkl checkpoint"):
        load_weights(model, tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()
