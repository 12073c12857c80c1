"""detection.data.augment: stage one and stage two must derive identical geometry and pixels from the plan."""

from __future__ import annotations

import json

import pytest
import torch

from detection.config import get_cfg
from detection.data.augment import (
    AugmentationPlan,
    AugParams,
    apply_boxes,
    apply_image,
    apply_masks,
    apply_polygons,
    invert_boxes,
    resized_shape,
)
from detection.errors import UserError


def test_resize_rule_is_shortest_edge_with_a_cap():
    assert resized_shape(480, 640, 800, 1333) == (800 / 480, 800, 1067)  # 640 * 5/3 = 1066.67 -> 1067
    scale, h, w = resized_shape(100, 1000, 800, 1333)  # the long side would be 8000: capped
    assert scale == pytest.approx(1.333) and (h, w) == (133, 1333)
    assert resized_shape(37, 51, 0, 1333) == (1.0, 37, 51)  # 0 = no resize


def test_plan_from_config_follows_input_and_cache_keys():
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "INPUT.MIN_SIZE_TRAIN",
            "[64, 72]",
            "INPUT.MAX_SIZE_TRAIN",
            "100",
            "CACHE.AUG_SEED",
            "5",
            "CACHE.NUM_VARIANTS",
            "3",
            "INPUT.MIN_SIZE_TEST",
            "70",
            "INPUT.MAX_SIZE_TEST",
            "90",
        ]
    )
    train = AugmentationPlan.for_training(cfg)
    assert train == AugmentationPlan(seed=5, num_variants=3, min_sizes=[64, 72], max_size=100, flip=True)
    test = AugmentationPlan.for_testing(cfg)
    assert test == AugmentationPlan(seed=5, num_variants=1, min_sizes=[70], max_size=90, flip=False)
    cfg.INPUT.RANDOM_FLIP = "none"
    assert not AugmentationPlan.for_training(cfg).flip
    cfg.INPUT.RANDOM_FLIP = "vertical"
    with pytest.raises(UserError, match="RANDOM_FLIP"):
        AugmentationPlan.for_training(cfg)


def test_params_are_a_pure_function_of_seed_image_variant_and_size():
    a = AugmentationPlan(seed=3, num_variants=4, min_sizes=[64, 80, 96], max_size=200, flip=True)
    b = AugmentationPlan(seed=3, num_variants=4, min_sizes=[64, 80, 96], max_size=200, flip=True)
    forward = [a.params(i, v, 60, 90) for i in range(20) for v in range(4)]
    backward = [b.params(i, v, 60, 90) for i in reversed(range(20)) for v in reversed(range(4))]
    assert forward == list(reversed(backward))
    other_seed = AugmentationPlan(seed=4, num_variants=4, min_sizes=[64, 80, 96], max_size=200, flip=True)
    assert [other_seed.params(i, v, 60, 90) for i in range(20) for v in range(4)] != forward


def test_variants_of_one_image_are_distinct_and_cover_sizes_and_flips():
    plan = AugmentationPlan(seed=0, num_variants=4, min_sizes=[64, 80], max_size=500, flip=True)

    def combo(image_id: int, v: int) -> tuple[int, bool]:
        p = plan.params(image_id, v, 50, 70)
        return p.resized_h, p.flip

    for image_id in range(10):
        assert len({combo(image_id, v) for v in range(4)}) == 4  # 2 sizes x 2 flips, no duplicate
    assert len({combo(image_id, 0) for image_id in range(10)}) > 1  # variant 0 is not one fixed choice
    assert {combo(1, v) for v in range(4)} == {(64, False), (64, True), (80, False), (80, True)}


def test_testing_plan_never_flips_and_uses_the_test_size():
    plan = AugmentationPlan(seed=0, num_variants=1, min_sizes=[64], max_size=96, flip=False)
    for image_id in range(10):
        p = plan.params(image_id, 0, 50, 100)
        assert not p.flip and (p.resized_h, p.resized_w) == (48, 96)  # capped by max_size 96


def test_params_reject_out_of_range_variants_and_bad_plans():
    plan = AugmentationPlan(seed=0, num_variants=2, min_sizes=[64], max_size=96, flip=True)
    with pytest.raises(UserError, match="variant 2 is out of range"):
        plan.params(1, 2, 50, 50)
    with pytest.raises(UserError, match="NUM_VARIANTS"):
        AugmentationPlan(seed=0, num_variants=0, min_sizes=[64], max_size=96, flip=True)
    with pytest.raises(UserError, match="MIN_SIZE_TRAIN"):
        AugmentationPlan(seed=0, num_variants=1, min_sizes=[], max_size=96, flip=True)


def test_plan_and_params_round_trip_through_json():
    plan = AugmentationPlan(seed=11, num_variants=3, min_sizes=(64, 72, 80), max_size=120, flip=True)
    restored = AugmentationPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan
    assert [restored.params(i, v, 77, 55) for i in range(5) for v in range(3)] == [
        plan.params(i, v, 77, 55) for i in range(5) for v in range(3)
    ]
    p = plan.params(4, 2, 77, 55)
    assert AugParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(UserError, match="missing"):
        AugmentationPlan.from_dict({"seed": 1})


def test_sample_variant_uses_every_variant_once_per_cycle_and_is_deterministic():
    plan = AugmentationPlan(seed=2, num_variants=3, min_sizes=[64, 80], max_size=200, flip=True)
    for image_id in range(5):
        draws = [plan.sample_variant(epoch, image_id) for epoch in range(9)]
        assert draws == [plan.sample_variant(epoch, image_id) for epoch in range(9)]
        for cycle in range(3):
            assert sorted(draws[3 * cycle : 3 * cycle + 3]) == [0, 1, 2]
    orders = {tuple(plan.sample_variant(e, i) for e in range(3)) for i in range(20)}
    assert len(orders) > 1  # images do not all walk the variants in the same order
    single = AugmentationPlan(seed=2, num_variants=1, min_sizes=[64], max_size=200, flip=True)
    assert {single.sample_variant(e, 7) for e in range(5)} == {0}


def params(flip: bool, rh: int, rw: int, h: int = 40, w: int = 60) -> AugParams:
    return AugParams(image_id=1, variant=0, scale=rh / h, flip=flip, orig_h=h, orig_w=w, resized_h=rh, resized_w=rw)


def test_box_transform_matches_manual_math_under_resize_and_flip():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 60.0, 40.0]])
    p = params(flip=False, rh=60, rw=90)
    assert torch.equal(apply_boxes(boxes, p), torch.tensor([[15.0, 7.5, 45.0, 37.5], [0.0, 0.0, 90.0, 60.0]]))
    p = params(flip=True, rh=60, rw=90)
    # x -> 90 - 1.5 x, and x1/x2 swap so boxes stay x1 < x2
    assert torch.equal(apply_boxes(boxes, p), torch.tensor([[45.0, 7.5, 75.0, 37.5], [0.0, 0.0, 90.0, 60.0]]))
    assert torch.allclose(invert_boxes(apply_boxes(boxes, p), p), boxes)
    assert apply_boxes(torch.zeros((0, 4)), p).shape == (0, 4)


def test_per_axis_factors_follow_the_rounded_size():
    # 30x47 -> short side 40: 47 * 4/3 = 62.67 rounds to 63, so x scales by 63/47 (not 4/3), as the image does
    p = AugmentationPlan(seed=0, num_variants=1, min_sizes=[40], max_size=0, flip=False).params(1, 0, 30, 47)
    assert (p.resized_h, p.resized_w) == (40, 63)
    out = apply_boxes(torch.tensor([[0.0, 0.0, 47.0, 30.0]]), p)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 63.0, 40.0]]))


@pytest.mark.parametrize("flip", [False, True])
def test_a_drawn_box_lands_where_apply_boxes_says(flip):
    image = torch.zeros(3, 40, 60)
    image[:, 5:25, 10:30] = 255.0  # the pixels of box [10, 5, 30, 25]
    p = params(flip=flip, rh=80, rw=120)  # exact 2x: bilinear edges threshold exactly at the box
    out = apply_image(image, p)
    rows, cols = torch.nonzero(out[0] > 127.5, as_tuple=True)
    drawn = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
    assert torch.equal(drawn, apply_boxes(torch.tensor([[10.0, 5.0, 30.0, 25.0]]), p)[0])


def test_a_drawn_box_lands_within_a_pixel_at_non_integer_scales():
    image = torch.zeros(3, 40, 60)
    image[:, 5:25, 10:30] = 255.0
    p = AugmentationPlan(seed=0, num_variants=1, min_sizes=[53], max_size=0, flip=True).params(1, 0, 40, 60)
    rows, cols = torch.nonzero(apply_image(image, p)[0] > 127.5, as_tuple=True)
    drawn = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
    assert (drawn - apply_boxes(torch.tensor([[10.0, 5.0, 30.0, 25.0]]), p)[0]).abs().max() <= 1.0


def test_apply_image_is_deterministic_and_flip_is_a_mirror():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 37, 53, generator=g) * 255
    plain, flipped = params(False, 50, 72, 37, 53), params(True, 50, 72, 37, 53)
    a, b = apply_image(image, plain), apply_image(image, plain)
    assert a.dtype == torch.float32 and a.shape == (3, 50, 72) and torch.equal(a, b)
    assert torch.equal(apply_image(image, flipped), a.flip(-1))
    with pytest.raises(ValueError, match="does not match"):
        apply_image(torch.zeros(3, 10, 10), plain)


def test_masks_and_polygons_follow_the_boxes():
    masks = torch.zeros(1, 40, 60, dtype=torch.uint8)
    masks[0, 5:25, 10:30] = 1
    p = params(flip=True, rh=80, rw=120)
    out = apply_masks(masks, p)
    assert out.dtype == torch.uint8 and out.shape == (1, 80, 120)
    rows, cols = torch.nonzero(out[0], as_tuple=True)
    assert [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1] == apply_boxes(
        torch.tensor([[10.0, 5.0, 30.0, 25.0]]), p
    )[0].tolist()
    assert apply_masks(torch.zeros(0, 40, 60, dtype=torch.uint8), p).shape == (0, 80, 120)
    poly = apply_polygons([[10, 5, 30, 5, 30, 25, 10, 25]], p)[0].reshape(-1, 2)
    assert poly[:, 0].min() == 60 and poly[:, 0].max() == 100 and poly[:, 1].min() == 10 and poly[:, 1].max() == 50


@pytest.mark.parametrize(
    "size,out", [((64, 80), (96, 120)), ((37, 53), (64, 91)), ((480, 640), (800, 1066)), ((64, 80), (48, 60))]
)
def test_resize_does_not_depend_on_the_thread_count_and_is_bilinear(size, out):
    """Issue 10, hole 7: DataLoader workers resize with 1 torch thread, the main process with N; the
    cached teacher features (and stage two's pixels) must not depend on which did it."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *size), generator=gen).float()
    p = AugParams(
        image_id=1,
        variant=0,
        scale=out[0] / size[0],
        flip=False,
        orig_h=size[0],
        orig_w=size[1],
        resized_h=out[0],
        resized_w=out[1],
    )
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            results.append(apply_image(image, p))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    reference = torch.nn.functional.interpolate(image[None], size=out, mode="bilinear", align_corners=False)[0]
    assert (results[0] - reference).abs().max() < 0.05  # the same bilinear (0-255 pixels)
