"""Shared fixtures: one tiny synthetic COCO dataset per session, a config pointing at it, and (for stage
two) a tiny saved teacher with a cache of its features and a config for tiny ICD runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cache_contract.identity import identity_attributes
from cache_contract.teacher import fpn_and_head_weights, load_teacher, sample_features
from cache_format import CacheWriter, LevelSpec, SampleMeta
from cache_format.integrity import finish_cache
from detection.config import CfgNode, get_cfg
from detection.data.augment import AugmentationPlan
from detection.data.datasets import train_index
from detection.data.synthetic import generate
from detection.modeling.detector import build_detector
from stage1_teacher_dump.samples import DumpDataset, enumerate_samples

# The test machines are shared: keep torch to one thread everywhere.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are collected everywhere (so they stay importable and counted) and skipped
    where torch sees no GPU; `make gpu-check` runs them on a GPU machine."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """16 train + 8 val synthetic images of height 64: {root, train_json, train_images, val_json, val_images}."""
    return generate(tmp_path_factory.mktemp("tiny_coco"), train=16, val=8, size=64, seed=0)


@pytest.fixture
def cfg_tiny(tiny_coco: dict[str, str], tmp_path) -> CfgNode:
    """A fresh, unfrozen config for tiny CPU runs on `tiny_coco` (datasets synth_train / synth_val)."""
    return make_cfg_tiny(tiny_coco, tmp_path / "output")


def make_cfg_tiny(tiny_coco: dict[str, str], output_dir: Path) -> CfgNode:
    """cfg_tiny's config, for fixtures of a wider scope than a test."""
    cfg = get_cfg()
    cfg.merge_from_dict(
        {
            "OUTPUT_DIR": str(output_dir),
            "MODEL": {
                "DEVICE": "cpu",
                "BACKBONE": {"DEPTH": 18},
                "FPN": {"OUT_CHANNELS": 32},
                "ANCHOR_GENERATOR": {"SIZES": [8, 16, 32, 64, 128]},
            },
            "INPUT": {"MIN_SIZE_TRAIN": [64], "MAX_SIZE_TRAIN": 96, "MIN_SIZE_TEST": 64, "MAX_SIZE_TEST": 96},
            "DATASETS": {
                "TRAIN": ["synth_train"],
                "TEST": ["synth_val"],
                "CATALOG": {
                    "synth_train": [tiny_coco["train_json"], tiny_coco["train_images"]],
                    "synth_val": [tiny_coco["val_json"], tiny_coco["val_images"]],
                },
            },
            "DATALOADER": {"NUM_WORKERS": 0},
            "SOLVER": {"IMS_PER_BATCH": 2},
        },
        source="tests/conftest.py",
    )
    return cfg


def masked_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two seeded images (50 x 70 with two instances, 64 x 45 with none) and targets with masks: the
    instance-segmentation models' (CondInst, SOLOv2) forward tests."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 50, 70, generator=g) * 255, torch.rand(3, 64, 45, generator=g) * 255]
    masks = torch.zeros(2, 50, 70, dtype=torch.uint8)
    masks[0, 6:40, 4:30] = 1
    masks[1, 10:33, 35:66] = 1
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [35.0, 10.0, 66.0, 33.0]]),
            "labels": torch.tensor([1, 4]),
            "masks": masks,
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 64, 45, dtype=torch.uint8),
        },
    ]
    return images, targets


# --- stage two ---------------------------------------------------------------------------------------
def make_distill_cfg(cfg: CfgNode, **overrides: Any) -> CfgNode:
    """cfg_tiny turned into a tiny ICD run: 32-channel ICD modules, few queries, short schedules."""
    cfg = cfg.clone()
    cfg.merge_from_dict(
        {
            "SEED": 3,
            "DISTILL": {
                "HIDDEN_DIM": 32,
                "NUM_HEADS": 8,
                "FFN_DIM": 64,
                "MAX_QUERIES": 12,
                "WARMUP_DETACH_ITERS": 1,
                "OPTIMIZER": {"WARMUP_ITERS": 1},
            },
            "SOLVER": {
                "MAX_ITER": 3,
                "BASE_LR": 0.01,
                "WARMUP_ITERS": 1,
                "STEPS": [],
                "CHECKPOINT_PERIOD": 1000,
                "LOG_PERIOD": 1,
            },
        },
        source="tests/conftest.py",
    )
    if overrides:
        cfg.merge_from_dict(overrides, source="test overrides")
    return cfg


@pytest.fixture
def distill_cfg() -> Callable[..., CfgNode]:
    """distill_cfg(cfg, **overrides): a config for a tiny ICD run built on `cfg` (usually cfg_tiny)."""
    return make_distill_cfg


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
    """Dump cfg's teacher (MODEL.WEIGHTS) over every (image, variant) of DATASETS.TRAIN, except `skip`.

    Written the way stage one writes (its sample enumeration, DumpDataset, the contract's teacher
    features and identity records) straight through CacheWriter, so the stage-two tests do not depend on
    the dump's orchestration (budget planning, background writer, multi-process).
    """
    index = train_index(cfg)
    plan = AugmentationPlan.for_training(cfg)
    samples = enumerate_samples(index, plan)
    teacher = load_teacher(cfg, index.num_classes, torch.device("cpu"))
    max_h = max(p.resized_h for _, p in samples)
    max_w = max(p.resized_w for _, p in samples)
    levels = [
        LevelSpec(name, stride, teacher.out_channels, -(-max_h // stride), -(-max_w // stride))
        for name, stride in teacher.strides.items()
    ]
    writer = CacheWriter.create(
        url,
        num_samples=len(samples),
        levels=levels,
        encoding=encoding,
        attributes=identity_attributes(cfg, index, plan),
        shard_samples=4,
        tile=16,
    )
    writer.put_teacher_weights(fpn_and_head_weights(teacher))
    dataset = DumpDataset(samples)
    for i in range(len(dataset)):
        if i in skip:
            continue
        record = dataset[i]
        p = record["params"]
        (features,) = sample_features(teacher, [record["image"]], [lv.name for lv in levels])
        writer.write_sample(
            i,
            {name: feature.numpy() for name, feature in features.items()},
            SampleMeta(p.image_id, p.variant, p.scale, p.flip, p.resized_h, p.resized_w),
            record["boxes"],
            record["classes"],
        )
    writer.close()
    finish_cache(url)  # as stage one finishes a dump: the manifest, written last (`skip` stay uncommitted)
    return url


# Built once per session: (dataset root, encoding, variants, skipped samples, sizes) -> (cache url, teacher weights)
_CACHES: dict[tuple, tuple[str, str]] = {}


@pytest.fixture
def teacher_cache(cfg_tiny: CfgNode, tiny_coco: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """make(encoding, variants, skip, min_sizes) -> (cache url, teacher weights); each cache is built once.

    The teacher is cfg_tiny's detector (seeded); `min_sizes` is its INPUT.MIN_SIZE_TRAIN (a student
    distilling from the cache must use the same); `skip` are sample indices left uncommitted.
    """

    def make(
        encoding: str = "fp32",
        variants: int = 1,
        skip: frozenset[int] = frozenset(),
        min_sizes: tuple[int, ...] = (64,),
    ) -> tuple[str, str]:
        key = (tiny_coco["root"], encoding, variants, frozenset(skip), tuple(min_sizes))
        if key not in _CACHES:
            root = tmp_path_factory.mktemp("stage2_cache")
            weights = save_teacher(cfg_tiny, root / "teacher.pth")
            tcfg = cfg_tiny.clone()
            tcfg.merge_from_dict(
                {
                    "MODEL": {"WEIGHTS": weights},
                    "CACHE": {"NUM_VARIANTS": variants},
                    "INPUT": {"MIN_SIZE_TRAIN": list(min_sizes)},
                },
                source="teacher_cache",
            )
            _CACHES[key] = (write_cache(tcfg, str(root / "cache.zarr"), encoding, frozenset(skip)), weights)
        return _CACHES[key]

    return make


REPO = Path(__file__).resolve().parents[1]


def run_dump_cli(cfg: CfgNode, cache: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`icd dump` of cfg into `cache` as a user runs it: a subprocess (so it can be killed, or spawn ranks)."""
    config = Path(cfg.OUTPUT_DIR) / "dump_config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(cfg.dump())
    return subprocess.run(
        [sys.executable, "-m", "icd", "dump", "--config-file", str(config), "--cache", cache, *extra],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def local_s3():
    """A real S3-protocol endpoint for the session: moto's server on 127.0.0.1:<free port> in a child
    process (bench/local_s3.py), stopped at the end. Skips only if it cannot start."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]' installs it)")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    from bench.local_s3 import LocalS3

    server = LocalS3()
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any failure to start is a reason to skip, named
        pytest.skip(f"the local S3 endpoint (moto server) could not start: {exc}")
    yield server
    server.stop()
