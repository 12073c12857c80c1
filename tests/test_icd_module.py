"""ICDModule end to end on tiny features: gradient routing, padding invariance, seeding, config, optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from detection.config.defaults import DEFAULTS
from detection.errors import UserError
from stage2_student_distill.method.module import ICDModule, build_icd_optimizer, cosine_with_warmup

torch.set_num_threads(1)
C = 16
LEVELS = ["p3", "p4"]
STRIDES = {"p3": 8, "p4": 16}
SIZES = [(60, 75), (33, 50)]  # padded batch 64 x 80


def small_module(**kw):
    torch.manual_seed(0)
    args = dict(levels=LEVELS, strides=STRIDES, num_heads=4, hidden_dim=C, ffn_dim=32, max_queries=20)
    args.update(kw)
    return ICDModule(3, C, **args)


def features(seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    feats = {"p3": torch.randn(2, C, 8, 10, generator=g), "p4": torch.randn(2, C, 4, 5, generator=g)}
    return {k: v.requires_grad_(requires_grad) for k, v in feats.items()}


TARGETS = [
    {"boxes": torch.tensor([[3.0, 4.0, 30.0, 40.0], [10.0, 10.0, 50.0, 58.0]]), "labels": torch.tensor([1, 3])},
    {"boxes": torch.tensor([[5.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([2])},
]


def run(module, teacher, student, detach=False, seed=0, targets=TARGETS):
    return module(teacher, student, SIZES, targets, torch.Generator().manual_seed(seed), detach)


@pytest.mark.parametrize("detach", [False, True])
def test_distill_gradient_reaches_student_iff_not_detached_and_never_the_teacher(detach):
    module = small_module()
    teacher, student = features(1, requires_grad=True), features(2, requires_grad=True)
    losses = run(module, teacher, student, detach=detach)
    assert set(losses) == {"loss_distill", "loss_ident", "loss_loc"}
    losses["loss_distill"].backward(retain_graph=True)
    if detach:
        assert all(student[k].grad is None for k in LEVELS)
    else:
        assert all(student[k].grad.abs().sum() > 0 for k in LEVELS)
    assert module.student_value.v_proj.weight.grad.abs().sum() > 0
    # the distillation loss trains neither the decoder nor the query encoder (mask and V_t detached)
    assert module.decoder.q_proj.weight.grad is None and module.query_encoder.mlp[0].weight.grad is None
    (losses["loss_ident"] + losses["loss_loc"]).backward()
    assert module.decoder.q_proj.weight.grad.abs().sum() > 0
    assert module.query_encoder.mlp[0].weight.grad.abs().sum() > 0
    assert all(teacher[k].grad is None for k in LEVELS)


def test_padded_features_do_not_change_the_losses():
    module = small_module()
    teacher, student = features(3), features(4)
    a = run(module, teacher, student)
    teacher2 = {k: v.clone() for k, v in teacher.items()}
    student2 = {k: v.clone() for k, v in student.items()}
    # image 1 (33 x 50) covers 5 x 7 positions of p3 and 3 x 4 of p4: scribble on the rest
    for feats in (teacher2, student2):
        feats["p3"][1, :, 5:, :] = 100.0
        feats["p3"][1, :, :, 7:] = -50.0
        feats["p4"][1, :, 3:, :] = 7.0
        feats["p4"][1, :, :, 4:] = 9.0
    b = run(module, teacher2, student2)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    teacher2["p3"][1, :, 0, 0] += 1.0  # a valid position does matter
    assert not torch.equal(run(module, teacher2, student2)["loss_distill"], a["loss_distill"])


def test_same_seed_same_losses():
    module = small_module()
    teacher, student = features(5), features(6)
    a, b = run(module, teacher, student, seed=3), run(module, teacher, student, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run(module, teacher, student, seed=4)
    assert not torch.equal(a["loss_ident"], c["loss_ident"])


def test_batch_without_ground_truth_gives_finite_losses_with_graph():
    module = small_module()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = run(module, features(7), features(8, requires_grad=True), targets=empty)
    assert losses["loss_distill"].item() == 0.0 and losses["loss_loc"].item() == 0.0
    assert losses["loss_ident"].item() > 0
    sum(losses.values()).backward()


def test_attention_masks_per_real_query_cropped_to_the_image():
    module = small_module()
    masks = module.attention_masks(features(9), SIZES, TARGETS)
    assert masks[0]["p3"].shape == (2, 4, 8, 10) and masks[0]["p4"].shape == (2, 4, 4, 5)
    assert masks[1]["p3"].shape == (1, 4, 5, 7) and masks[1]["p4"].shape == (1, 4, 3, 4)
    for per_image in masks:
        total = per_image["p3"].sum((-1, -2)) + per_image["p4"].sum((-1, -2))
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def test_bad_inputs_are_user_errors():
    module = small_module()
    teacher = features(10)
    wide = {k: torch.randn(2, 2 * C, *v.shape[2:]) for k, v in teacher.items()}
    with pytest.raises(UserError, match="channels"):
        run(module, teacher, wide)
    shifted = {"p3": torch.randn(2, C, 9, 10), "p4": teacher["p4"]}
    with pytest.raises(UserError, match="batch shape"):
        run(module, teacher, shifted)
    background = [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([0])}, TARGETS[1]]
    with pytest.raises(UserError, match="1..3"):
        run(module, teacher, features(11), targets=background)
    inverted = [{"boxes": torch.tensor([[5.0, 5.0, 1.0, 9.0]]), "labels": torch.tensor([1])}, TARGETS[1]]
    with pytest.raises(UserError, match="inverted"):
        run(module, teacher, features(11), targets=inverted)
    with pytest.raises(UserError, match="p5"):  # a level the features lack is named
        small_module(levels=["p3", "p5"], strides={"p3": 8, "p5": 32})(
            teacher, features(11), SIZES, TARGETS, torch.Generator(), False
        )
    with pytest.raises(UserError, match="needs 9x10 positions"):  # features too small for the image
        module(teacher, features(11), [(72, 75), SIZES[1]], TARGETS, torch.Generator(), False)
    with pytest.raises(UserError, match="Generator"):
        module(teacher, features(11), SIZES, TARGETS, None, False)
    with pytest.raises(UserError, match="HIDDEN_DIM"):
        ICDModule(3, 256, levels=LEVELS, strides=STRIDES, hidden_dim=128)


def test_levels_and_strides_are_checked_once_when_the_module_is_built():
    with pytest.raises(UserError, match="p4"):  # a level without a stride is named
        small_module(strides={"p3": 8})
    with pytest.raises(UserError, match="no stride given"):
        small_module(strides=[8])
    with pytest.raises(UserError, match="positive"):
        small_module(strides={"p3": 8, "p4": 0})
    with pytest.raises(UserError, match="no feature levels"):
        small_module(levels=[])
    module = small_module(strides=[8, 16])  # one stride per level, as a list, is the same binding
    assert module.levels == LEVELS and module.strides == STRIDES and module.stride_list == [8, 16]
    # bound, not saved: a module's checkpoint does not depend on its levels
    assert small_module(levels=["p3"], strides={"p3": 8}).state_dict().keys() == module.state_dict().keys()


def test_from_config_uses_the_distill_node():
    cfg = copy.deepcopy(DEFAULTS)
    module = ICDModule.from_config(cfg, num_classes=5, channels=256, levels=LEVELS, strides=STRIDES)
    assert module.decoder.num_heads == 8 and module.decoder.ffn[0].out_features == 1024
    assert module.loss_weight == 8.0 and module.temperature == 1.0
    assert module.query_builder.max_queries == 300 and module.query_builder.neg_ratio == 5
    assert module.query_builder.ref_jitter == 0.3
    assert module.query_encoder.mlp[0].in_features == 5 + 256 + 10


def test_optimizer_adamw_cosine():
    cfg = copy.deepcopy(DEFAULTS)
    cfg["SOLVER"]["MAX_ITER"] = 100
    module = small_module()
    optimizer, scheduler = build_icd_optimizer(module, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-4) and group["weight_decay"] == pytest.approx(1e-4)
    assert {id(p) for p in group["params"]} == {id(p) for p in module.parameters()}
    losses = run(module, features(12), features(13))
    sum(losses.values()).backward()
    optimizer.step()
    scheduler.step()
    # reference warm-up factor 1.0: plain cosine from the first iteration
    cosine = 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 100)).item())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * cosine)
    fresh_optimizer, fresh_scheduler = build_icd_optimizer(module, cfg)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    assert fresh_scheduler.last_epoch == 1


def test_warmup_then_cosine_schedule():
    f = cosine_with_warmup(max_iter=100, warmup_iters=10, warmup_factor=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx((0.1 * 0.5 + 0.5) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.05)).item()))
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)
