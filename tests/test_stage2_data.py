"""Stage two's cached data path: replayed pixels and boxes, variant choice, feature streaming and padding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cache_contract.geometry import batch_padded_shape, pad_levels
from cache_contract.identity import recorded_plan
from cache_format import CacheReader
from cache_format.errors import CacheError
from detection.data.datasets import train_index
from detection.data.loader import build_train_loader
from detection.modeling.detector import build_model
from stage1_teacher_dump.samples import DumpDataset, enumerate_samples
from stage2_student_distill.data import DistillCollate, DistillDataset, SampleTable, check_geometry

LEVELS = ["p3", "p4", "p5", "p6", "p7"]
STRIDES = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
MIN_SIZES = (48, 80)


def cached_dataset(cfg, url: str, read_features: bool = True) -> DistillDataset:
    reader = CacheReader(url)
    plan = recorded_plan(reader.attributes, url)
    table = SampleTable.from_reader(reader, plan.num_variants)
    return DistillDataset(
        train_index(cfg), plan, table=table, cache_url=url, levels=LEVELS, read_features=read_features
    )


def test_replayed_pixels_boxes_and_features_are_what_stage_one_saw(cfg_tiny, teacher_cache):
    url, _ = teacher_cache(variants=2, min_sizes=MIN_SIZES)
    cfg_tiny.INPUT.MIN_SIZE_TRAIN = list(MIN_SIZES)
    dataset = cached_dataset(cfg_tiny, url)
    reader = CacheReader(url)
    plan = recorded_plan(reader.attributes, url)
    stage_one = DumpDataset(enumerate_samples(train_index(cfg_tiny), plan))
    seen = set()
    for epoch in (0, 1):
        for i in range(0, len(dataset), 3):
            item = dataset[(epoch, i)]
            cached = reader.read_sample(item["cache_index"])
            dumped = stage_one[item["cache_index"]]
            assert torch.equal(item["image"], dumped["image"])
            assert torch.equal(item["target"]["boxes"], torch.from_numpy(cached.boxes))
            assert torch.equal(item["target"]["labels"] - 1, torch.from_numpy(cached.classes))
            for level in LEVELS:
                assert torch.equal(item["teacher_features"][level], torch.from_numpy(cached.features[level]))
            seen.add((item["aug"].flip, item["aug"].resized_h))
    assert len(seen) > 1  # flips / scales really were replayed, not only the identity


def test_each_epoch_draws_a_cached_variant_and_falls_back_to_a_committed_one(cfg_tiny, teacher_cache):
    # samples are (image k, variant v) -> 2k + v over images sorted by id: image 0 lacks variant 1,
    # image 1 has no sample at all.
    url, _ = teacher_cache(variants=2, skip=frozenset({1, 2, 3}), min_sizes=MIN_SIZES)
    cfg_tiny.INPUT.MIN_SIZE_TRAIN = list(MIN_SIZES)
    dataset = cached_dataset(cfg_tiny, url, read_features=False)
    plan = recorded_plan(CacheReader(url).attributes, url)
    images = sorted(im.id for im in train_index(cfg_tiny).images)
    assert dataset.skipped_images == 1
    assert len(dataset) == len(images) - 1
    variants: dict[int, set[int]] = {}
    for epoch in range(4):
        for i in range(len(dataset)):
            image, variant = dataset.locate((epoch, i))
            assert image.id != images[1]
            expected = 0 if image.id == images[0] else plan.sample_variant(epoch, image.id)
            assert variant == expected
            variants.setdefault(image.id, set()).add(variant)
    assert variants[images[0]] == {0}
    assert all(v == {0, 1} for image_id, v in variants.items() if image_id != images[0])


def test_collate_pads_teacher_levels_to_the_students_feature_shapes(cfg_tiny, teacher_cache):
    url, _ = teacher_cache(variants=2, min_sizes=MIN_SIZES)
    cfg_tiny.INPUT.MIN_SIZE_TRAIN = list(MIN_SIZES)
    dataset = cached_dataset(cfg_tiny, url)
    items = [dataset[(0, 0)], dataset[(0, 1)], dataset[(1, 5)]]
    sizes = [tuple(item["image"].shape[-2:]) for item in items]
    assert len(set(sizes)) > 1
    valid = [{k: v.clone() for k, v in item["teacher_features"].items()} for item in items]
    student = build_model(cfg_tiny, train_index(cfg_tiny).num_classes)
    batch = DistillCollate(LEVELS, student.strides, student.size_divisibility)(items)
    padded = batch_padded_shape(sizes, 32)
    with torch.no_grad():
        batched = student.preprocess([item["image"] for item in batch.samples]).tensors
        student_features = student.features(batched)
    assert tuple(batched.shape[-2:]) == padded
    for level in LEVELS:
        teacher = batch.teacher_features[level]
        assert teacher.shape == student_features[level].shape
        for i, features in enumerate(valid):
            h, w = features[level].shape[-2:]
            assert (h, w) == (-(-sizes[i][0] // STRIDES[level]), -(-sizes[i][1] // STRIDES[level]))
            assert torch.equal(teacher[i, :, :h, :w], features[level])
            outside = torch.ones(teacher.shape[-2:], dtype=torch.bool)
            outside[:h, :w] = False
            assert (teacher[i][:, outside] == 0).all()


def test_pad_levels_rounds_each_level_up_from_the_padded_batch():
    # 100 x 70 padded to 128 x 96: p7 has ceil(128/128) x ceil(96/128) = 1 x 1, p6 2 x 2, p3 16 x 12
    feats = [{"p3": torch.ones(2, 13, 9), "p6": torch.ones(2, 2, 2), "p7": torch.ones(2, 1, 1)}]
    out = pad_levels(feats, batch_padded_shape([(100, 70)], 32), ["p3", "p6", "p7"], STRIDES)
    assert [tuple(out[k].shape) for k in ("p3", "p6", "p7")] == [(1, 2, 16, 12), (1, 2, 2, 2), (1, 2, 1, 1)]
    assert out["p3"].sum() == 2 * 13 * 9
    with pytest.raises(AssertionError, match="17x9 > batch 16x12"):  # a contract, not a user's input
        pad_levels([{"p3": torch.ones(2, 17, 9)}], (128, 96), ["p3"], STRIDES)


def test_the_reader_is_opened_lazily_in_each_process_and_never_pickled(cfg_tiny, teacher_cache):
    url, _ = teacher_cache()
    dataset = cached_dataset(cfg_tiny, url)
    dataset[(0, 0)]
    assert dataset._reader is not None
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._reader is None
    assert torch.equal(clone[(0, 2)]["teacher_features"]["p5"], dataset[(0, 2)]["teacher_features"]["p5"])


def test_worker_loading_gives_the_same_batches_as_in_process_loading(cfg_tiny, teacher_cache):
    url, _ = teacher_cache()
    dataset = cached_dataset(cfg_tiny, url)
    collate = DistillCollate(LEVELS, STRIDES, 32)
    batches = {}
    for workers in (0, 1):
        cfg_tiny.DATALOADER.NUM_WORKERS = workers
        loader = iter(build_train_loader(cfg_tiny, dataset, collate)(start_iter=2))
        batches[workers] = [next(loader) for _ in range(2)]
    for a, b in zip(batches[0], batches[1]):
        assert [s["cache_index"] for s in a.samples] == [s["cache_index"] for s in b.samples]
        for level in LEVELS:
            assert torch.equal(a.teacher_features[level], b.teacher_features[level])


def test_a_cache_whose_geometry_the_plan_does_not_reproduce_is_refused(cfg_tiny, teacher_cache):
    url, _ = teacher_cache()
    reader = CacheReader(url)
    meta = reader.meta(0)
    plan = recorded_plan(reader.attributes, url)
    image = min(train_index(cfg_tiny).images, key=lambda im: im.id)
    params = plan.params(image.id, 0, image.height, image.width)
    check_geometry(meta, params, 0, url)
    wider = plan.params(image.id, 0, image.height, image.width + 7)
    with pytest.raises(CacheError, match="annotation file and images the cache was dumped from"):
        check_geometry(meta, wider, 0, url)


def test_sample_table_maps_images_and_variants_to_committed_samples(teacher_cache):
    url, _ = teacher_cache(variants=2, skip=frozenset({1, 2, 3}), min_sizes=MIN_SIZES)
    reader = CacheReader(url)
    table = SampleTable.from_reader(reader, 2)
    committed = np.flatnonzero(reader.committed())
    assert sorted(int(i) for i in table.samples[table.samples >= 0]) == committed.tolist()
    first = int(table.image_ids[0])
    assert table.sample_index(first, 0) == 0
    with pytest.raises(KeyError):
        table.sample_index(first, 1)


def test_every_mode_trains_on_the_same_batches_of_the_same_images_and_variants(cfg_tiny, teacher_cache):
    """What pairing modes by seed relies on (bench/accuracy.py): `icd train` (the baseline) and `icd distill`
    on a full cache draw the same (image, variant) batches for one SEED, epoch after epoch."""
    from detection.data.augment import AugmentationPlan
    from detection.data.datasets import DetectionDataset
    from detection.data.loader import InfiniteSampler, batch_stream

    url, _ = teacher_cache(variants=2, min_sizes=MIN_SIZES)
    cfg_tiny.INPUT.MIN_SIZE_TRAIN = list(MIN_SIZES)
    cfg_tiny.CACHE.NUM_VARIANTS = 2
    plan = AugmentationPlan.for_training(cfg_tiny)
    baseline = DetectionDataset(train_index(cfg_tiny), plan, training=True, variant_sampler=plan.sample_variant)
    cached = cached_dataset(cfg_tiny, url, read_features=False)
    assert len(baseline) == len(cached)

    def batches(dataset, seed: int) -> list[list[tuple[int, int]]]:
        stream = batch_stream(
            dataset,
            InfiniteSampler(len(dataset), seed=seed, yield_epoch=True, rank=0, world_size=1),
            batch_size=3,
            group_by_aspect=True,
        )
        return [[(im.id, v) for im, v in map(dataset.locate, next(stream))] for _ in range(4 * len(dataset) // 3)]

    assert batches(baseline, seed=5) == batches(cached, seed=5)
    assert batches(baseline, seed=5) != batches(baseline, seed=6)
