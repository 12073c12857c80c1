"""Integrity under damage and concurrency: flipped bytes, missing shards, a writer killed with SIGKILL
mid-shard, two writer processes on disjoint shards. Local stores, real files, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_format import CacheReader, CacheWriter, CorruptChunkError, LevelSpec
from cache_format.integrity import finish_cache
from cache_format.verify import verify_cache

LEVELS = [LevelSpec("p3", 8, 6, 10, 10), LevelSpec("p4", 16, 6, 5, 5)]
REPO = Path(__file__).resolve().parents[1]

# The child processes regenerate the same samples from the index, so the parent can check contents.
SAMPLE_CODE = """
import numpy as np
from cache_format import LevelSpec, SampleMeta
from cache_format.synthetic import fpn_like_features
LEVELS = [LevelSpec("p3", 8, 6, 10, 10), LevelSpec("p4", 16, 6, 5, 5)]
def sample(i):
    rng = np.random.default_rng(i)
    rh, rw = 80 - i, 60 + i
    return (fpn_like_features(rng, LEVELS, rh, rw), SampleMeta(i, 0, 1.0, False, rh, rw),
            np.full((i % 2, 4), i, np.float32), np.full(i % 2, i, np.int64))
"""
namespace: dict = {}
exec(SAMPLE_CODE, namespace)
sample = namespace["sample"]


def _create(path: Path, n: int = 8, encoding: str = "fp16") -> str:
    url = str(path)
    CacheWriter.create(
        url, num_samples=n, levels=LEVELS, encoding=encoding, attributes={"dataset": {"n": n}}, shard_samples=2, tile=4
    )
    return url


def _write_all(url: str) -> None:
    w = CacheWriter.open(url)
    for i in w.uncommitted_owned_samples():
        w.write_sample(i, *sample(i))
    w.close()
    finish_cache(url)


def _bad(report) -> set[str]:
    """The damaged objects a verify report names."""
    return {p.key for p in report.problems}


def _check_contents(url: str, indices) -> None:
    r = CacheReader(url)
    for i in indices:
        feats, meta, boxes, _ = sample(i)
        got = r.read_sample(i)
        assert got.meta == meta and np.array_equal(got.boxes, boxes)
        for name, x in feats.items():
            assert np.array_equal(got.features[name], x.astype(np.float16).astype(np.float32))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_chunk_is_caught_by_reader_and_verify(tmp_path):
    url = _create(tmp_path / "c")
    _write_all(url)
    assert verify_cache(url).ok
    shard = tmp_path / "c" / "features" / "p3" / "c" / "1" / "0" / "0" / "0"  # samples 2 and 3
    _flip(shard, 10)  # inside the first inner chunk
    report = verify_cache(url, workers=2)
    assert not report.ok
    assert _bad(report) == {"features/p3/c/1/0/0/0"}, report.summary()
    assert "shard 1, sample 2 level p3" in report.summary()
    with pytest.raises(CorruptChunkError, match="sample 2 level p3"):
        CacheReader(url).read_sample(2)
    _check_contents(url, [0, 1, 3, 4, 5, 6, 7])  # everything else intact


def test_damaged_shard_index_and_missing_shard_are_caught(tmp_path):
    url = _create(tmp_path / "c")
    _write_all(url)
    index_damaged = tmp_path / "c" / "features" / "p4" / "c" / "2" / "0" / "0" / "0"  # samples 4, 5
    _flip(index_damaged, index_damaged.stat().st_size - 8)
    (tmp_path / "c" / "features" / "p3" / "c" / "3" / "0" / "0" / "0").unlink()  # samples 6, 7
    report = verify_cache(url)
    assert _bad(report) == {"features/p4/c/2/0/0/0", "features/p3/c/3/0/0/0"}, report.summary()
    with pytest.raises(CorruptChunkError, match="sample 6 level p3: stored values fail their checksum"):
        CacheReader(url).read_level(6, "p3")


def test_truncated_shard_file_is_caught(tmp_path):
    url = _create(tmp_path / "c")
    _write_all(url)
    shard = tmp_path / "c" / "features" / "p3" / "c" / "0" / "0" / "0" / "0"  # samples 0, 1
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = verify_cache(url)
    assert _bad(report) == {"features/p3/c/0/0/0/0"}, report.summary()
    with pytest.raises(CorruptChunkError, match="sample 1 level p3"):
        CacheReader(url).read_sample(1)


def test_damaged_records_and_instances_are_reported(tmp_path):
    url = _create(tmp_path / "c")
    _write_all(url)
    _flip(tmp_path / "c" / "samples" / "records" / "c" / "0" / "0", 12)
    _flip(tmp_path / "c" / "instances" / "boxes" / "c" / "1" / "0", 5)  # shard 1: sample 3 has a box
    report = verify_cache(url)
    assert _bad(report) == {"samples/records/c/0/0", "instances/boxes/c/1/0"}, report.summary()


CHILD_KILL = (
    SAMPLE_CODE
    + """
import sys, time
from cache_format import CacheWriter
w = CacheWriter.open(sys.argv[1])
records = w._arrays.records

class Stall:
    # Signals once the features of the second shard are written and waits before its records
    # (the commit) so the parent can SIGKILL this process in the middle of a shard write.
    def __init__(self):
        self.calls = 0
    def __setitem__(self, key, value):
        self.calls += 1
        if self.calls == 2:
            print("MIDWRITE", flush=True)
            time.sleep(60)
        records[key] = value
    def __getattr__(self, name):
        return getattr(records, name)

w._arrays.records = Stall()
for i in w.uncommitted_owned_samples():
    w.write_sample(i, *sample(i))
w.close()
"""
)


def test_kill_9_mid_write_leaves_a_verifiable_store_that_resumes(tmp_path):
    url = _create(tmp_path / "c")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", CHILD_KILL, url], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "MIDWRITE"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # shard 1's features are on disk, its records are not: only shard 0 is visible
    assert (tmp_path / "c" / "features" / "p3" / "c" / "1" / "0" / "0" / "0").is_file()
    assert not verify_cache(url).ok  # unfinished: no manifest
    report = verify_cache(url, require_manifest=False)  # what is committed is intact
    assert report.ok and report.integrity.committed.sum() == 2, report.summary()
    assert CacheReader(url).committed().tolist() == [True, True] + [False] * 6
    w = CacheWriter.open(url)
    assert w.uncommitted_owned_samples() == [2, 3, 4, 5, 6, 7]
    _write_all(url)
    report = verify_cache(url)
    assert report.ok and report.integrity.committed.sum() == 8, report.summary()
    _check_contents(url, range(8))


CHILD_RANK = (
    SAMPLE_CODE
    + """
import sys
from cache_format import CacheWriter
w = CacheWriter.open(sys.argv[1], rank=int(sys.argv[2]), world_size=2)
for i in w.owned_samples():
    w.write_sample(i, *sample(i))
w.close()
print(",".join(map(str, w.owned_samples())))
"""
)


def test_two_writer_processes_on_disjoint_shards_make_a_valid_store(tmp_path):
    url = _create(tmp_path / "c", n=9)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD_RANK, url, str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].strip() == "0,1,4,5,8" and outs[1][0].strip() == "2,3,6,7"
    finish_cache(url)
    report = verify_cache(url)
    assert report.ok and report.integrity.committed.sum() == 9, report.summary()
    _check_contents(url, range(9))


def test_reader_sees_samples_committed_after_it_opened(tmp_path):
    url = _create(tmp_path / "c", n=4)
    r = CacheReader(url)
    assert not r.committed().any()
    w = CacheWriter.open(url)
    for i in (0, 1):
        w.write_sample(i, *sample(i))
    assert r.committed().tolist() == [True, True, False, False]  # write_sample wrote the full shard
    assert r.read_sample(1).meta.image_id == 1
