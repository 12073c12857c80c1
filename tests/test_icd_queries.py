"""Instance queries: count formula, real/fake content, fake box priors and clipping, descriptors, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from detection.errors import UserError
from stage2_student_distill.method.queries import (
    QueryBuilder,
    QueryEncoder,
    count_queries,
    estimate_priors,
    scale_indicator,
)

torch.set_num_threads(1)
K = 3  # classes


def random_targets(counts, size=(200, 300), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    targets = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = 2 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2 - 2, h / 2 - 2])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, K, (n,), generator=g)})
    return targets


@pytest.mark.parametrize("n,expected", [(0, 1), (1, 6), (10, 60), (50, 300), (60, 300), (400, 400)])
def test_count_formula(n, expected):
    assert count_queries(n, 5, 300) == expected
    assert count_queries(n, 5, 300) == min(max(1, math.floor(n * 6)), max(300, n))


def test_batch_padding_and_real_first():
    builder = QueryBuilder(K)
    targets = random_targets([2, 0, 7])
    q = builder(targets, [(200, 300)] * 3, torch.Generator().manual_seed(1))
    assert q.descriptors.shape == (3, 42, K + 256 + 10)
    assert q.is_real.sum(1).tolist() == [2, 0, 7]
    assert (~q.padding).sum(1).tolist() == [12, 1, 42]
    for i, n in enumerate([2, 0, 7]):
        assert q.is_real[i, :n].all() and not q.is_real[i, n:].any()
        # real boxes are normalised by the resized (w, h)
        expected = targets[i]["boxes"] / torch.tensor([300.0, 200.0, 300.0, 200.0])
        assert torch.allclose(q.boxes[i, :n], expected)
        assert torch.equal(q.labels[i, :n], targets[i]["labels"])
    # padded slots are empty and flagged
    assert not q.descriptors[0, 12:].any() and q.padding[0, 12:].all()


def test_fake_boxes_uniform_prior_ranges():
    builder = QueryBuilder(K)
    q = builder(random_targets([60]), [(200, 300)], torch.Generator().manual_seed(2))
    fake = q.boxes[0][~q.is_real[0] & ~q.padding[0]]
    assert len(fake) == 240
    wh = fake[:, 2:] - fake[:, :2]
    assert (fake >= 0).all() and (fake <= 1).all()  # clipped to the image
    # uniform prior mean 0.2 std 0.2 -> mean + 2 std = 0.6; lower bound 0.002
    assert (wh >= 0.002 - 1e-6).all() and (wh <= 0.6 + 1e-6).all()
    assert wh.std() > 0.05  # really drawn, not constant


def test_fake_boxes_follow_the_class_prior_and_its_two_std_clip():
    mean = torch.tensor([[0.5, 0.5], [0.01, 0.02], [0.5, 0.5]])
    std = torch.tensor([[0.1, 0.1], [0.004, 0.001], [0.1, 0.1]])
    builder = QueryBuilder(K, class_prior=[0, 5, 0], size_prior_mean=mean, size_prior_std=std)
    q = builder(random_targets([40]), [(200, 300)], torch.Generator().manual_seed(3))
    fake = ~q.is_real[0] & ~q.padding[0]
    assert (q.labels[0][fake] == 1).all()
    boxes = q.boxes[0][fake]
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    # small boxes are never cut by the image: centre in [0.03, 0.97], size within mean +- 2 std
    assert (centre >= 0.03 - 1e-6).all() and (centre <= 0.97 + 1e-6).all()
    assert (wh[:, 0] >= 0.002 - 1e-6).all() and (wh[:, 0] <= 0.018 + 1e-6).all()
    assert (wh[:, 1] >= 0.018 - 1e-6).all() and (wh[:, 1] <= 0.022 + 1e-6).all()


def test_fake_sizes_are_clipped_to_absolute_range():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 10), "labels": torch.zeros(10, dtype=torch.long)}]
    big = QueryBuilder(1, size_prior_mean=[[0.95, 0.95]], size_prior_std=[[0.01, 0.01]])
    q = big(targets, [(100, 100)], torch.Generator().manual_seed(4))
    fake = q.boxes[0, 10:60]
    wh = fake[:, 2:] - fake[:, :2]
    # 0.7 at most; exactly 0.7 where the image did not cut the box
    assert (wh <= 0.7 + 1e-6).all() and wh.max().item() == pytest.approx(0.7, abs=1e-6)
    tiny = QueryBuilder(1, size_prior_mean=[[0.0, 0.0]], size_prior_std=[[1e-4, 1e-4]], max_queries=50)
    q = tiny(targets, [(100, 100)], torch.Generator().manual_seed(5))
    fake = q.boxes[0, 10:50]
    assert torch.allclose(fake[:, 2:] - fake[:, :2], torch.full((40, 2), 0.002), atol=1e-6)


def test_reference_points_are_jittered_within_03_of_the_size():
    builder = QueryBuilder(K)
    q = builder(random_targets([30]), [(200, 300)], torch.Generator().manual_seed(6))
    valid = ~q.padding[0]
    boxes, ref = q.boxes[0][valid], q.ref_points[0][valid]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    wh = boxes[:, 2:] - boxes[:, :2]
    rel = (ref - centre) / wh
    assert (rel.abs() <= 0.3 + 1e-5).all()
    assert rel.abs().max() > 0.2 and rel.min() < 0 < rel.max()


def test_descriptor_layout():
    builder = QueryBuilder(K, max_queries=2)
    target = {"boxes": torch.tensor([[10.0, 20.0, 110.0, 60.0]]), "labels": torch.tensor([2])}
    q = builder([target], [(200, 300)], torch.Generator().manual_seed(7))
    d = q.descriptors[0, 0]
    assert d[:K].tolist() == [0, 0, 1]
    x, y = q.ref_points[0, 0].tolist()
    for i in (0, 1, 6, 127):
        trig = math.sin if i % 2 == 0 else math.cos
        div = 10000 ** (2 * (i // 2) / 128)
        assert d[K + i].item() == pytest.approx(trig(x * 2 * math.pi / div), abs=1e-5)
        assert d[K + 128 + i].item() == pytest.approx(trig(y * 2 * math.pi / div), abs=1e-5)
    # 100 px wide -> bin 1, 40 px high -> bin 0
    assert d[K + 256 :].tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 0, 0]


def test_scale_indicator_bins():
    sizes = [10.0, 64.0, 66.0, 100.0, 150.0, 300.0, 500.0, 600.0, 5000.0, 0.0]
    expected = [0, 0, 1, 1, 2, 3, 3, 4, 4, 0]
    for size, b in zip(sizes, expected):
        if size > 0:
            assert min(max(math.floor(1.44 * math.log(size) - 5), 0), 4) == b
    ind = scale_indicator(torch.tensor([[s, 64.0] for s in sizes]))
    assert ind.shape == (10, 10)
    assert ind[:, :5].argmax(1).tolist() == expected
    assert (ind[:, 5:].argmax(1) == 0).all() and (ind.sum(1) == 2).all()


def test_same_seed_same_queries_and_other_seed_differs():
    builder = QueryBuilder(K)
    targets = random_targets([3, 5])
    a = builder(targets, [(200, 300), (150, 120)], torch.Generator().manual_seed(11))
    b = builder(targets, [(200, 300), (150, 120)], torch.Generator().manual_seed(11))
    c = builder(targets, [(200, 300), (150, 120)], torch.Generator().manual_seed(12))
    for name in ("descriptors", "ref_points", "boxes", "labels", "is_real", "padding"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.boxes, c.boxes) and not torch.equal(a.ref_points, c.ref_points)


def test_bad_settings_name_the_problem():
    # (targets and the generator are checked once, at the entry of the ICD module: test_icd_module)
    with pytest.raises(UserError, match="class prior"):
        QueryBuilder(K, class_prior=[1.0, -1.0, 1.0])


def test_estimate_priors_and_encoder_shape():
    labels = torch.tensor([0, 0, 2])
    sizes = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.5]])
    freq, mean, std = estimate_priors(labels, sizes, K)
    assert freq.tolist() == [2, 0, 1]
    assert torch.allclose(mean[0], torch.tensor([0.2, 0.3])) and torch.allclose(std[0], torch.tensor([0.1, 0.1]))
    assert torch.allclose(mean[1], torch.tensor([0.2, 0.2]))  # no instances: uniform prior
    encoder = QueryEncoder(K + 266)
    assert sum(isinstance(m, torch.nn.Linear) for m in encoder.modules()) == 3
    assert encoder(torch.zeros(2, 4, K + 266)).shape == (2, 4, 256)
