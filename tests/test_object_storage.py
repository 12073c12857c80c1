"""Caches on object storage, against a real S3-protocol endpoint (moto's server, fixture `local_s3`).

Everything goes through HTTP exactly as with AWS/MinIO/Ceph: s3fs -> botocore, endpoint and dummy
credentials from the standard AWS environment variables. One tiny teacher is dumped once to local disk
(the reference) and once to s3:// (module fixtures); the tests compare against the reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cfg_tiny, make_distill_cfg, run_dump_cli

from cache_format import CacheReader
from cache_format import cli as cache_cli
from cache_format.errors import CacheError
from cache_format.store import usage
from detection.data.datasets import load_dataset
from detection.engine.checkpoint import save_checkpoint
from detection.modeling.detector import build_detector
from stage1_teacher_dump.dump import KILL_AFTER_ENV, run_dump
from stage2_student_distill.cli import build_distill_trainer
from stage2_student_distill.data import DistillDataset

REPO = Path(__file__).resolve().parents[1]
BUCKET = "icd-tests"
BUDGET = 2_000_000  # bytes: the fp32 tiny cache (~1 MB with the teacher weights) fits


@pytest.fixture(scope="module")
def s3(local_s3):
    """This process (and every child it starts) talks to the local endpoint through AWS_* variables."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in local_s3.env().items():
            mp.setenv(key, value)
        local_s3.make_bucket(BUCKET)
        yield local_s3


@pytest.fixture(scope="module")
def teacher(tiny_coco, tmp_path_factory):
    """A seeded random teacher on tiny_coco; fp32 cache of its 16 images (one variant each, two sizes
    drawn) in 4 shards of 4 samples."""
    work = tmp_path_factory.mktemp("s3_teacher")
    cfg = make_cfg_tiny(tiny_coco, work / "output")
    torch.manual_seed(0)
    model = build_detector(cfg, load_dataset(cfg, "synth_train").num_classes + 1)
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS",
            str(save_checkpoint(work / "teacher" / "model_final.pth", model)),
            "CACHE.ENCODING",
            "fp32",
            "CACHE.SHARD_SAMPLES",
            "4",
            "CACHE.BATCH_SIZE",
            "2",
            "CACHE.NUM_VARIANTS",
            "1",
            "INPUT.MIN_SIZE_TRAIN",
            "[48, 64]",
            "CACHE.CALIBRATION_SAMPLES",
            "2",
        ]
    )
    return cfg, work


@pytest.fixture(scope="module")
def reference(teacher) -> str:
    """The dump on local disk (with --budget, as the s3 one)."""
    cfg, work = teacher
    return run_dump(cfg, str(work / "reference"), budget=BUDGET).cache


@pytest.fixture(scope="module")
def s3_cache(s3, teacher) -> str:
    """The same dump written straight to s3:// (in this process)."""
    cfg, _ = teacher
    return run_dump(cfg, f"s3://{BUCKET}/dump/cache", budget=BUDGET).cache


def objects(local_s3, prefix: str) -> dict[str, bytes]:
    """Every object under s3://BUCKET/prefix, by key relative to the prefix."""
    fs = local_s3.filesystem()
    root = f"{BUCKET}/{prefix}"
    return {key[len(root) + 1 :]: fs.cat_file(key) for key in fs.find(root)}


def local_files(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_same_samples(expected_url: str, actual_url: str) -> None:
    """Per sample: decoded features, meta and instances equal; the records (checksums included) equal."""
    a, b = CacheReader(expected_url), CacheReader(actual_url)
    assert b.committed().all() and a.num_samples == b.num_samples
    np.testing.assert_array_equal(a.records(), b.records())  # committed, geometry, crc32c per level
    for sa, sb in zip(a.read_samples(range(a.num_samples)), b.read_samples(range(b.num_samples))):
        assert sa.meta == sb.meta
        np.testing.assert_array_equal(sa.boxes, sb.boxes)
        np.testing.assert_array_equal(sa.classes, sb.classes)
        for name in sa.features:
            np.testing.assert_array_equal(sa.features[name], sb.features[name])


def assert_no_secret(local_s3, texts: list[str], dirs: list[Path], prefixes: list[str]) -> None:
    """Neither the secret key nor the key id appears in output, files under `dirs` or stored objects."""
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    blobs = [t.encode() for t in texts]
    for d in dirs:
        blobs += list(local_files(str(d)).values())
    for prefix in prefixes:
        blobs += list(objects(local_s3, prefix).values())
    assert len(blobs) >= 3
    for secret in secrets:
        assert not any(secret in blob for blob in blobs), "a credential was written out"


# --- stage one --------------------------------------------------------------------------------------
def test_dump_to_s3_is_identical_to_the_local_dump(s3, reference, s3_cache) -> None:
    stored, local = objects(s3, "dump/cache"), local_files(reference)
    assert stored.keys() == local.keys()  # same objects: per-shard features, records, instances, weights
    assert all(stored[key] == local[key] for key in local), "an object differs byte for byte"
    assert_same_samples(reference, s3_cache)
    assert usage(s3_cache) == usage(reference) and usage(s3_cache)[1] <= BUDGET


def test_kill_9_then_resume_on_s3(s3, teacher, reference) -> None:
    cfg, work = teacher
    url = f"s3://{BUCKET}/killed/cache"
    out = cfg.clone()
    out.OUTPUT_DIR = str(work / "killed_output")
    killed = run_dump_cli(out, url, env={KILL_AFTER_ENV: "10"})  # mid-shard: 2 shards of 4 committed
    assert killed.returncode == -9, killed.stderr
    partial = CacheReader(url).committed()
    assert 0 < partial.sum() < partial.size
    assert cache_cli.main(["verify", url, "--no-manifest"]) == 0  # what is committed is intact
    assert cache_cli.main(["verify", url]) == 1  # but the cache is not whole: its dump did not finish
    summary = run_dump(cfg, url, budget=BUDGET, resume=True)
    assert summary.written_now == partial.size - partial.sum()
    assert_same_samples(reference, url)
    assert_no_secret(s3, [killed.stdout, killed.stderr], [Path(out.OUTPUT_DIR)], [])


def test_two_writer_processes_on_disjoint_shards(s3, teacher, reference) -> None:
    cfg, work = teacher
    url = f"s3://{BUCKET}/two/cache"
    out = cfg.clone()
    out.OUTPUT_DIR = str(work / "two_output")
    result = run_dump_cli(out, url, "--num-gpus", "2")
    assert result.returncode == 0, result.stderr
    assert_same_samples(reference, url)
    assert_no_secret(s3, [result.stdout, result.stderr], [Path(out.OUTPUT_DIR)], ["two/cache"])


# --- icd cache --------------------------------------------------------------------------------------
def test_verify_names_a_deleted_and_a_corrupted_object(s3, s3_cache, capsys) -> None:
    fs = s3.filesystem()
    src, dst = f"{BUCKET}/dump/cache", f"{BUCKET}/damaged/cache"
    for key in fs.find(src):  # server-side copies
        fs.copy(key, dst + key[len(src) :])
    url = f"s3://{dst}"
    fs.rm(f"{dst}/features/p4/c/1/0/0/0")  # shard 1 = samples 4-7
    blob = bytearray(fs.cat_file(f"{dst}/features/p3/c/3/0/0/0"))  # shard 3 = samples 12-15
    blob[len(blob) // 3] ^= 0x40
    fs.pipe_file(f"{dst}/features/p3/c/3/0/0/0", bytes(blob))
    assert cache_cli.main(["verify", url]) == 1
    out = capsys.readouterr().out
    bad = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.strip().startswith("BAD")}
    assert set(bad) == {"features/p4/c/1/0/0/0", "features/p3/c/3/0/0/0"}, out  # each damaged object, named
    assert "shard 1, samples 4-7" in bad["features/p4/c/1/0/0/0"] and "shard 3" in bad["features/p3/c/3/0/0/0"]


def test_inspect_plan_and_repack_on_s3(s3, reference, s3_cache, tmp_path, capsys) -> None:
    assert cache_cli.main(["inspect", "--json", s3_cache]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert cache_cli.main(["inspect", "--json", reference]) == 0
    local = json.loads(capsys.readouterr().out)
    for key in ("files", "bytes_on_disk", "samples_committed", "feature_bytes", "teacher_weights", "identity"):
        assert remote[key] == local[key], key
    assert (
        cache_cli.main(["plan", "--calib", s3_cache, "--calib-samples", "2", "--samples", "1000", "--budget", "1GB"])
        == 0
    )
    assert "choice:" in capsys.readouterr().out
    s3_int8, local_int8 = f"s3://{BUCKET}/repacked/int8", str(tmp_path / "int8")
    assert cache_cli.main(["repack", s3_cache, s3_int8, "--encoding", "int8"]) == 0  # s3 -> s3
    assert cache_cli.main(["repack", reference, local_int8, "--encoding", "int8"]) == 0  # local -> local
    assert local_files(local_int8) == objects(s3, "repacked/int8")
    back = str(tmp_path / "back")
    assert cache_cli.main(["repack", s3_cache, back, "--encoding", "fp32"]) == 0  # s3 -> local, lossless
    assert_same_samples(reference, back)


def test_errors_are_one_clear_line(s3, tmp_path) -> None:
    with pytest.raises(CacheError, match="carries credentials") as info:
        CacheReader(f"s3://AKIAEXAMPLE:hunter2@{BUCKET}/dump/cache")
    assert "hunter2" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
    with pytest.raises(CacheError, match=r"(?s)nobucket.*create the bucket"):
        from cache_format import CacheWriter
        from cache_format.schema import LevelSpec

        CacheWriter.create("s3://nobucket/c", num_samples=1, levels=[LevelSpec("p3", 8, 4, 2, 2)], encoding="fp16")
    if importlib.util.find_spec("gcsfs") is None:  # gs:// goes the same way, with its own package
        with pytest.raises(CacheError, match=r"(?s)gs:// caches need the gcsfs package.*pip install -e '\.\[gcs\]'"):
            CacheReader("gs://bucket/cache")
    # A filesystem package that is missing: one line naming the extra, exit 2, no traceback.
    hide = "import sys; sys.modules['s3fs'] = None; from icd.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", hide, "cache", "inspect", f"s3://{BUCKET}/dump/cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("icd cache inspect: error: s3:// caches need the s3fs package")
    assert "pip install -e '.[s3]'" in run.stderr
    # An unreachable endpoint is an access problem (exit 2), never "damage" or "not a cache".
    dead = subprocess.run(
        [sys.executable, "-m", "icd", "cache", "verify", f"s3://{BUCKET}/dump/cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"},
    )
    assert dead.returncode == 2 and "Traceback" not in dead.stderr, dead.stderr
    assert dead.stderr.startswith("icd cache verify: error: cannot reach the store holding s3://"), dead.stderr
    assert "fix: check AWS_ENDPOINT_URL" in dead.stderr and len(dead.stderr.splitlines()) == 2


# --- stage two --------------------------------------------------------------------------------------
def distill(cfg, cache: str, online: bool = False):
    """(trainer, per-iteration losses from metrics.json) of a short distillation run."""
    trainer = build_distill_trainer(cfg, cache, online=online, with_evaluation=False)
    trainer.train()
    lines = (Path(cfg.OUTPUT_DIR) / "metrics.json").read_text().splitlines()
    return trainer, [
        {
            k: v
            for k, v in json.loads(line).items()
            if k.startswith("loss") or k in ("classification", "bbox_regression")
        }
        for line in lines
        if "loss_distill" in line
    ]


def student(teacher_cfg, out: Path, **overrides):
    cfg = make_distill_cfg(teacher_cfg, OUTPUT_DIR=str(out), **overrides)
    cfg.MODEL.WEIGHTS = ""
    return cfg


def test_distill_from_s3_equals_distill_from_disk(s3, teacher, reference, s3_cache, tmp_path, capfd) -> None:
    cfg, _ = teacher
    # Two DataLoader workers, each reading through its own S3 connection (checked below).
    runs = {
        name: distill(
            student(cfg, tmp_path / name, SOLVER={"MAX_ITER": 3, "IMS_PER_BATCH": 4}, DATALOADER={"NUM_WORKERS": 2}),
            url,
        )
        for name, url in (("local", reference), ("s3", s3_cache))
    }
    assert len(runs["s3"][1]) == 3 and runs["s3"][1] == runs["local"][1]  # bit for bit: the same bytes
    captured = capfd.readouterr()
    assert_no_secret(s3, [captured.out, captured.err], [tmp_path / "s3"], [])
    workers_open_their_own_filesystem(runs["s3"][0].build_loader(0).dataset)


def workers_open_their_own_filesystem(dataset: DistillDataset) -> None:
    """Each DataLoader worker reads through a filesystem handle of its own, not the parent's."""
    from torch.utils.data import DataLoader

    parent_fs = id(dataset.reader()._store.fs)  # the parent has used the store before the fork

    def features_sum(item: dict) -> float:
        return sum(float(v.sum()) for v in item["teacher_features"].values())

    class Probe(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            item = dataset.__getitems__([(0, i)])[0]
            return os.getpid(), id(dataset.reader()._store.fs), features_sum(item)

    seen = list(DataLoader(Probe(), batch_size=None, num_workers=2))
    assert len({pid for pid, _, _ in seen}) == 2 and os.getpid() not in {pid for pid, _, _ in seen}
    assert parent_fs not in {fs for _, fs, _ in seen}
    expected = [features_sum(dataset.__getitems__([(0, i)])[0]) for i in range(4)]
    assert sorted(total for _, _, total in seen) == sorted(expected)


def test_online_distill_with_an_s3_cache(s3, teacher, reference, s3_cache, tmp_path) -> None:
    cfg, _ = teacher
    runs = {
        name: distill(student(cfg, tmp_path / name, SOLVER={"MAX_ITER": 2}), url, online=True)[1]
        for name, url in (("local", reference), ("s3", s3_cache))
    }
    assert len(runs["s3"]) == 2 and runs["s3"] == runs["local"]
