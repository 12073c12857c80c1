"""Stage one end to end on the tiny synthetic set: what the cache holds is what the teacher computes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_dump_cli

from cache_contract.geometry import padded_shape
from cache_contract.teacher import load_teacher, sample_features
from cache_format import CacheReader
from detection.config import CfgNode
from detection.data.augment import AugmentationPlan, apply_boxes, apply_image
from detection.data.datasets import load_dataset, read_image
from detection.engine.checkpoint import save_checkpoint
from detection.errors import UserError
from detection.modeling.detector import build_detector
from stage1_teacher_dump.batching import shard_batches
from stage1_teacher_dump.dump import KILL_AFTER_ENV, run_dump

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def teacher_cfg(cfg_tiny: CfgNode, tmp_path: Path) -> CfgNode:
    """cfg_tiny with a (randomly initialised, seeded) teacher checkpoint and a small cache layout."""
    torch.manual_seed(0)
    cfg = cfg_tiny.clone()
    teacher = build_detector(cfg, load_dataset(cfg, "synth_train").num_classes + 1)
    weights = save_checkpoint(tmp_path / "teacher" / "model_final.pth", teacher)
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS",
            str(weights),
            "CACHE.ENCODING",
            "fp32",
            "CACHE.SHARD_SAMPLES",
            "4",
            "CACHE.BATCH_SIZE",
            "2",
            "CACHE.NUM_VARIANTS",
            "2",
            "INPUT.MIN_SIZE_TRAIN",
            "[48, 64]",
            "CACHE.CALIBRATION_SAMPLES",
            "4",
        ]
    )
    return cfg


def _all_samples(url: str) -> list:
    reader = CacheReader(url)
    return [reader.read_sample(i) for i in range(reader.num_samples)]


def test_cached_features_and_boxes_replay_exactly(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    """A cached sample is the teacher's output for it, bit for bit, when the teacher sees the batch the dump
    formed (stage1_teacher_dump.batching); alone, it is equal up to float32 rounding: convolutions over batches
    of other sizes round differently on some CPUs (1e-5 absolute on an AMD EPYC, not on an Intel Xeon)."""
    cache = str(tmp_path / "cache")
    summary = run_dump(teacher_cfg, cache)
    index = load_dataset(teacher_cfg, "synth_train")
    assert summary.committed == summary.num_samples == 2 * len(index.images)
    reader = CacheReader(cache)
    assert reader.committed().all()
    assert reader.attributes["dataset"]["num_images"] == len(index.images)
    plan = AugmentationPlan.from_dict(reader.attributes["augmentation"])
    teacher = load_teacher(teacher_cfg, index.num_classes, torch.device("cpu"))
    levels = reader.level_names
    assert levels == ["p3", "p4", "p5", "p6", "p7"]
    images = {im.id: im for im in index.images}
    samples = [reader.read_sample(i) for i in range(reader.num_samples)]
    shapes = {
        i: padded_shape(s.meta.resized_h, s.meta.resized_w, teacher.size_divisibility) for i, s in enumerate(samples)
    }
    batches = shard_batches(
        range(reader.num_samples), shapes, int(teacher_cfg.CACHE.SHARD_SAMPLES), int(teacher_cfg.CACHE.BATCH_SIZE)
    )
    assert max(len(b) for b in batches) == 2  # some samples shared a teacher forward with another

    def pixels(i: int) -> torch.Tensor:
        sample = samples[i]
        image = images[sample.meta.image_id]
        p = plan.params(image.id, sample.meta.variant, image.height, image.width)
        assert (p.resized_h, p.resized_w, p.flip) == (sample.meta.resized_h, sample.meta.resized_w, sample.meta.flip)
        boxes = torch.tensor([a.bbox_xyxy for a in image.instances], dtype=torch.float32).reshape(-1, 4)
        np.testing.assert_array_equal(sample.boxes, apply_boxes(boxes, p).numpy())
        np.testing.assert_array_equal(sample.classes, [a.label - 1 for a in image.instances])
        return apply_image(read_image(image), p)

    checked = {0, 3, 5, reader.num_samples - 1}
    for batch in (b for b in batches if checked & set(b)):
        inputs = [pixels(i) for i in batch]
        as_dumped = sample_features(teacher, inputs, levels)
        for i, x, features in zip(batch, inputs, as_dumped):
            (alone,) = sample_features(teacher, [x], levels)
            for lv in reader.levels:
                cached = samples[i].features[lv.name]
                assert cached.shape[-2:] == (-(-x.shape[-2] // lv.stride), -(-x.shape[-1] // lv.stride))
                np.testing.assert_array_equal(cached, features[lv.name].numpy())
                reference = alone[lv.name].numpy()
                np.testing.assert_allclose(cached, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
    assert reader.has_teacher_weights()
    stored = reader.teacher_weights()
    own = teacher.fpn_and_head_state_dict()
    assert set(stored) == set(own)
    key = next(iter(own))
    np.testing.assert_array_equal(stored[key], own[key].numpy())


def test_thread_count_changes_only_the_rounding(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    """README's Determinism section: bytes hold for one machine, torch thread count and CACHE.BATCH_SIZE (workers,
    processes and resumes: test_faults_dump.py); another thread count, like another batch size (above), changes
    float32 rounding in the teacher's convolutions (it does on an AMD EPYC), never more."""
    run_dump(teacher_cfg, str(tmp_path / "threads1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_dump(teacher_cfg, str(tmp_path / "threads2"))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(_all_samples(str(tmp_path / "threads1")), _all_samples(str(tmp_path / "threads2"))):
        assert a.meta == b.meta
        np.testing.assert_array_equal(a.boxes, b.boxes)
        for name, value in b.features.items():
            np.testing.assert_allclose(a.features[name], value, rtol=0, atol=1e-4 * np.abs(value).max())


def test_lossy_encoding_within_its_bound(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    exact, lossy = str(tmp_path / "fp32"), str(tmp_path / "fp16")
    run_dump(teacher_cfg, exact)
    cfg = teacher_cfg.clone()
    cfg.CACHE.ENCODING = "fp16"
    run_dump(cfg, lossy)
    for a, b in zip(_all_samples(exact), _all_samples(lossy)):
        for name, value in a.features.items():
            # fp16 rounds to 11 significant bits: relative error <= 2**-11 (plus subnormal slack).
            np.testing.assert_allclose(b.features[name], value, rtol=2**-11, atol=1e-7)


def test_existing_cache_is_never_overwritten_and_resume_checks_identity(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    run_dump(teacher_cfg, cache)
    with pytest.raises(UserError, match="(?s)already exists.*--resume"):
        run_dump(teacher_cfg, cache)
    other = teacher_cfg.clone()
    other.CACHE.AUG_SEED = 7
    with pytest.raises(UserError, match="augmentation.seed: cache has 0, this run has 7"):
        run_dump(other, cache, resume=True)
    contradicting = teacher_cfg.clone()
    contradicting.CACHE.ENCODING = "int8"
    with pytest.raises(UserError, match="CACHE.ENCODING: cache has fp32, this run has int8"):
        run_dump(contradicting, cache, resume=True)
    # Resuming a complete cache writes nothing and keeps it complete.
    assert run_dump(teacher_cfg, cache, resume=True).written_now == 0


def test_unreadable_image_is_named_or_skipped_and_recorded(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    import shutil

    src = Path(teacher_cfg.DATASETS.CATALOG["synth_train"][1])
    images = tmp_path / "images"
    shutil.copytree(src, images)
    victim = sorted(images.iterdir())[1]
    victim.write_bytes(b"not a png")
    cfg = teacher_cfg.clone()
    cfg.DATASETS.CATALOG["synth_train"] = [teacher_cfg.DATASETS.CATALOG["synth_train"][0], str(images)]
    with pytest.raises(UserError, match=victim.name):
        run_dump(cfg, str(tmp_path / "stop"))
    cfg.CACHE.SKIP_UNREADABLE = True
    summary = run_dump(cfg, str(tmp_path / "skip"))
    assert len(summary.skipped) == cfg.CACHE.NUM_VARIANTS and victim.name in summary.skipped[0]
    assert summary.committed == summary.num_samples - cfg.CACHE.NUM_VARIANTS
    assert victim.name in (Path(cfg.OUTPUT_DIR) / "skipped_images.json").read_text()


def test_budget_too_small_refuses_before_writing(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cfg = teacher_cfg.clone()
    cfg.CACHE.ENCODING = "auto"
    with pytest.raises(Exception, match="(?i)budget"):
        run_dump(cfg, str(cache), budget=1000)
    assert not cache.exists()
    with pytest.raises(UserError, match="no --budget"):
        run_dump(cfg, str(cache))
    summary = run_dump(cfg, str(cache), budget=10**9, dry_run=True)
    assert summary.plan_table and summary.encoding and not cache.exists()


def test_finished_cache_stays_within_its_budget(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    from cache_format import CacheError
    from cache_format.store import usage

    cfg = teacher_cfg.clone()
    cfg.CACHE.ENCODING = "auto"
    with pytest.raises(UserError, match="does not even hold the teacher"):
        run_dump(cfg, str(tmp_path / "tiny"), budget=10_000)
    finished = 0
    # Teacher weights here are ~0.7 MB and the features 0.15-0.35 MB: from "nothing fits" to "lossless fits".
    for budget in (750_000, 900_000, 1_200_000):
        cache = tmp_path / f"cache_{budget}"
        try:
            run_dump(cfg, str(cache), budget=budget)
        except (UserError, CacheError) as exc:
            assert "budget" in str(exc) and not cache.exists()
            continue
        finished += 1
        assert usage(str(cache))[1] <= budget, f"cache of {usage(str(cache))[1]} bytes over its {budget}-byte budget"
    assert finished >= 1


def test_kill_9_then_resume_equals_uninterrupted_dump(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    reference, crashed = str(tmp_path / "reference"), str(tmp_path / "crashed")
    run_dump(teacher_cfg, reference)
    kill_after = int(np.random.default_rng(0).integers(5, 27))  # mid-shard, after some shards committed
    killed = run_dump_cli(teacher_cfg, crashed, env={KILL_AFTER_ENV: str(kill_after)})
    assert killed.returncode == -9, killed.stderr
    partial = CacheReader(crashed).committed()
    assert 0 < partial.sum() < partial.size
    verify = subprocess.run(
        [sys.executable, "-m", "icd", "cache", "verify", crashed, "--no-manifest"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr  # what is committed is intact; unfinished
    resumed = run_dump_cli(teacher_cfg, crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for a, b in zip(_all_samples(reference), _all_samples(crashed)):
        assert a.meta == b.meta
        for name in a.features:
            np.testing.assert_array_equal(a.features[name], b.features[name])


def test_two_process_dump_equals_one_process_dump(teacher_cfg: CfgNode, tmp_path: Path) -> None:
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_dump(teacher_cfg, one)
    result = run_dump_cli(teacher_cfg, two, "--num-gpus", "2")
    assert result.returncode == 0, result.stderr
    for a, b in zip(_all_samples(one), _all_samples(two)):
        assert a.meta == b.meta
        np.testing.assert_array_equal(a.boxes, b.boxes)
        for name in a.features:
            np.testing.assert_array_equal(a.features[name], b.features[name])


def test_full_disk_stops_cleanly_and_resumes(teacher_cfg: CfgNode, tmp_path: Path, monkeypatch) -> None:
    import errno

    from cache_format import CacheWriter

    reference, cache = str(tmp_path / "reference"), str(tmp_path / "cache")
    run_dump(teacher_cfg, reference)
    original = CacheWriter.write_sample
    calls = {"n": 0}

    def write_until_full(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:  # two shards of 4 committed, the third half written
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "write_sample", write_until_full)
    with pytest.raises(UserError, match="(?s)disk holding .* is full.*--resume"):
        run_dump(teacher_cfg, cache)
    committed = CacheReader(cache).committed()
    assert committed[:8].all() and not committed[8:].any()
    monkeypatch.setattr(CacheWriter, "write_sample", original)
    assert run_dump(teacher_cfg, cache, resume=True).written_now == committed.size - 8
    for a, b in zip(_all_samples(reference), _all_samples(cache)):
        for name in a.features:
            np.testing.assert_array_equal(a.features[name], b.features[name])
