"""Shared helpers for the stage-two tests: a tiny saved teacher, a cache of its features, a student config.

The cache is written the way stage one writes it (its sample enumeration, DumpDataset, teacher forward,
valid-region cut and identity records) straight through CacheWriter, so these tests do not depend on
the dump's orchestration (budget planning, background writer, multi-process).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cache_format import CacheWriter, LevelSpec, SampleMeta
from detection.augment import AugmentationPlan
from detection.config import CfgNode
from detection.train import train_index
from detection.zoo import build_detector
from stage1_teacher_dump.identity import dataset_identity, preprocessing_identity, teacher_identity
from stage1_teacher_dump.samples import DumpDataset, enumerate_samples
from stage1_teacher_dump.teacher import fpn_and_head_weights, load_teacher, teacher_features, valid_region

# Built once per session: (dataset root, encoding, variants, skipped samples) -> (cache url, teacher weights path)
_CACHES: dict[tuple, tuple[str, str]] = {}


def distill_cfg(cfg: CfgNode, **overrides: Any) -> CfgNode:
    """cfg_tiny turned into a tiny ICD run: 32-channel ICD modules, few queries, short schedules."""
    cfg = cfg.clone()
    cfg.merge_from_dict({
        "SEED": 3,
        "DISTILL": {"HIDDEN_DIM": 32, "NUM_HEADS": 8, "FFN_DIM": 64, "MAX_QUERIES": 12, "WARMUP_DETACH_ITERS": 1,
                    "OPTIMIZER": {"WARMUP_ITERS": 1}},
        "SOLVER": {"MAX_ITER": 3, "BASE_LR": 0.01, "WARMUP_ITERS": 1, "STEPS": [], "CHECKPOINT_PERIOD": 1000,
                   "LOG_PERIOD": 1},
    }, source="tests/test_stage2_support.py")
    if overrides:
        cfg.merge_from_dict(overrides, source="test overrides")
    return cfg


def save_teacher(cfg: CfgNode, path: Path, seed: int = 11) -> str:
    """A randomly initialised (seeded) teacher of cfg's architecture, saved as MODEL.WEIGHTS would be."""
    k = train_index(cfg).num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = build_detector(cfg, k + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": teacher.state_dict()}, path)
    return str(path)


def write_cache(cfg: CfgNode, url: str, encoding: str = "fp32", skip: frozenset[int] = frozenset()) -> str:
    """Dump cfg's teacher (MODEL.WEIGHTS) over every (image, variant) of DATASETS.TRAIN, except `skip`."""
    index = train_index(cfg)
    plan = AugmentationPlan.for_training(cfg)
    samples = enumerate_samples(index, plan)
    teacher = load_teacher(cfg, index.num_classes, torch.device("cpu"))
    max_h = max(p.resized_h for _, p in samples)
    max_w = max(p.resized_w for _, p in samples)
    levels = [LevelSpec(name, stride, teacher.out_channels, -(-max_h // stride), -(-max_w // stride))
              for name, stride in teacher.strides.items()]
    attributes = {
        "teacher": teacher_identity(cfg), "preprocessing": preprocessing_identity(cfg),
        "dataset": dataset_identity(cfg.DATASETS.TRAIN[0], index.json_path, len(index.images)),
        "augmentation": plan.to_dict(), "num_classes": index.num_classes, "class_names": index.class_names,
    }
    writer = CacheWriter.create(url, num_samples=len(samples), levels=levels, encoding=encoding,
                                attributes=attributes, shard_samples=4, tile=16)
    writer.put_teacher_weights(fpn_and_head_weights(teacher))
    dataset = DumpDataset(samples)
    for i in range(len(dataset)):
        if i in skip:
            continue
        record = dataset[i]
        p = record["params"]
        feats = teacher_features(teacher, [record["image"]], [lv.name for lv in levels])
        writer.write_sample(i, {lv.name: valid_region(feats[lv.name][0], lv.stride, p.resized_h, p.resized_w)
                                for lv in levels},
                            SampleMeta(p.image_id, p.variant, p.scale, p.flip, p.resized_h, p.resized_w),
                            record["boxes"], record["classes"])
    writer.close()
    return url


@pytest.fixture
def teacher_cache(cfg_tiny: CfgNode, tiny_coco: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """make(encoding, variants, skip, min_sizes) -> (cache url, teacher weights); each cache is built once.

    The teacher is cfg_tiny's detector (seeded); `min_sizes` is its INPUT.MIN_SIZE_TRAIN (a student
    distilling from the cache must use the same); `skip` are sample indices left uncommitted.
    """

    def make(encoding: str = "fp32", variants: int = 1, skip: frozenset[int] = frozenset(),
             min_sizes: tuple[int, ...] = (64,)) -> tuple[str, str]:
        key = (tiny_coco["root"], encoding, variants, frozenset(skip), tuple(min_sizes))
        if key not in _CACHES:
            root = tmp_path_factory.mktemp("stage2_cache")
            weights = save_teacher(cfg_tiny, root / "teacher.pth")
            tcfg = cfg_tiny.clone()
            tcfg.merge_from_dict({"MODEL": {"WEIGHTS": weights}, "CACHE": {"NUM_VARIANTS": variants},
                                  "INPUT": {"MIN_SIZE_TRAIN": list(min_sizes)}}, source="teacher_cache")
            _CACHES[key] = (write_cache(tcfg, str(root / "cache.zarr"), encoding, frozenset(skip)), weights)
        return _CACHES[key]

    return make
