"""Bad input gives a clear CacheError naming the problem: not a cache, newer version, truncated store,
wrong channel count / level set / size, another rank's shard, bad names, incompatible students."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import zarr

from cache_format import CacheError, CacheReader, CacheWriter, LevelSpec, SampleMeta, check_compatibility

LEVELS = [LevelSpec("p3", 8, 4, 8, 8), LevelSpec("p4", 16, 4, 4, 4)]
META = SampleMeta(1, 0, 1.0, False, 60, 50)


def _feats(c: int = 4) -> dict[str, np.ndarray]:
    return {"p3": np.ones((c, 8, 7), np.float32), "p4": np.ones((c, 4, 4), np.float32)}


def _writer(url: str | None = None, **kw) -> CacheWriter:
    url = url or f"memory://test-cache-err-{uuid.uuid4().hex}"
    args = dict(
        num_samples=8,
        levels=LEVELS,
        encoding="fp16",
        attributes={"preprocessing": {"pixel_mean": [1, 2, 3]}},
        shard_samples=2,
        tile=4,
    )
    args.update(kw)
    return CacheWriter.create(url, **args)


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="not a cache: no such directory"):
        CacheReader(str(tmp_path / "missing"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(CacheError, match="not a cache"):
        CacheReader(str(tmp_path / "junk"))
    zarr.open_group(str(tmp_path / "other"), mode="w", attributes={"something": 1})
    with pytest.raises(CacheError, match="not a cache: its root has no"):
        CacheReader(str(tmp_path / "other"))


def test_newer_major_version_refused_minor_accepted(tmp_path):
    url = str(tmp_path / "c")
    _writer(url).close()
    meta_path = tmp_path / "c" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = "1.7"
    meta_path.write_text(json.dumps(meta))
    assert CacheReader(url).attributes["format_version"] == "1.7"  # newer minor: still readable
    meta["attributes"]["format_version"] = "2.0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"format version 2\.0, newer than the 1\.1") as info:
        CacheReader(url)
    assert "upgrade" in info.value.fix


def test_truncated_store(tmp_path):
    url = str(tmp_path / "c")
    w = _writer(url)
    w.write_sample(0, _feats(), META)
    w.close()
    (tmp_path / "c" / "features" / "p4" / "zarr.json").unlink()
    with pytest.raises(CacheError, match="truncated: array 'features/p4' is missing"):
        CacheReader(url)


def test_wrong_channel_count_level_set_and_size():
    w = _writer()
    with pytest.raises(CacheError, match="level p3: shape \\(3, 8, 7\\), expected 4 channels"):
        w.write_sample(0, _feats(3), META)
    with pytest.raises(CacheError, match=r"missing \['p4'\], unexpected \['p5'\]"):
        w.write_sample(0, {"p3": _feats()["p3"], "p5": _feats()["p4"]}, META)
    with pytest.raises(CacheError, match="valid size \\(8, 7\\)"):
        w.write_sample(0, {"p3": np.ones((4, 8, 8), np.float32), "p4": _feats()["p4"]}, META)
    with pytest.raises(CacheError, match="exceeds the cache's maximum"):
        big = SampleMeta(1, 0, 1.0, False, 100, 50)
        w.write_sample(0, {"p3": np.ones((4, 13, 7), np.float32), "p4": np.ones((4, 7, 4), np.float32)}, big)
    with pytest.raises(CacheError, match="3 boxes but 2 classes"):
        w.write_sample(0, _feats(), META, np.zeros((3, 4), np.float32), np.zeros(2, np.int64))
    with pytest.raises(CacheError, match="out of range"):
        w.write_sample(8, _feats(), META)


def test_writer_refuses_another_ranks_shard_and_committed_samples():
    url = f"memory://test-cache-rank-{uuid.uuid4().hex}"
    _writer(url).close()
    w1 = CacheWriter.open(url, rank=1, world_size=2)
    assert w1.owned_samples() == [2, 3, 6, 7]
    with pytest.raises(
        CacheError, match=r"sample 0 is in shard 0, owned by rank 0, not by this writer \(rank 1 of 2\)"
    ):
        w1.write_sample(0, _feats(), META)
    w1.write_sample(2, _feats(), META)
    w1.write_sample(3, _feats(), META)  # shard 1 complete -> committed
    with pytest.raises(CacheError, match="already committed"):
        w1.write_sample(3, _feats(), META)
    with pytest.raises(CacheError, match="not a valid writer slot"):
        CacheWriter.open(url, rank=2, world_size=2)


def test_create_refuses_existing_store_unless_overwrite():
    url = f"memory://test-cache-exists-{uuid.uuid4().hex}"
    _writer(url).close()
    with pytest.raises(CacheError, match="already exists"):
        _writer(url)
    _writer(url, overwrite=True, num_samples=3).close()
    assert CacheReader(url).num_samples == 3


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(encoding="fp12"), "unknown encoding 'fp12'"),
        (dict(encoding="int8+bitround3"), "int8 has no mantissa"),
        (dict(encoding="fp16+bitround12"), "keepbits 12 out of range"),
        (dict(compressor="gzip"), "unknown compressor 'gzip'"),
        (dict(attributes={"levels": 1}), "reserved"),
        (dict(attributes={"teacher": {"depth": np.int64(50)}}), "not plain JSON"),
        (dict(num_samples=0), "num_samples must be >= 1"),
        (dict(levels=[LevelSpec("p3", 8, 4, 8, 8), LevelSpec("p3", 16, 4, 4, 4)]), "repeat"),
    ],
)
def test_bad_create_arguments(kw, match):
    with pytest.raises(CacheError, match=match):
        _writer(**kw)


def test_instance_capacity_is_enforced_with_a_fix():
    w = _writer(instance_capacity=2)  # 2 samples per shard x 2 = 4 rows per shard
    w.write_sample(0, _feats(), META, np.zeros((3, 4), np.float32), np.ones(3, np.int64))
    with pytest.raises(CacheError, match="capacity 4") as info:
        w.write_sample(1, _feats(), META, np.zeros((2, 4), np.float32), np.ones(2, np.int64))
    assert "instance_capacity" in info.value.fix


def test_check_compatibility_names_each_differing_field():
    attrs = CacheReader(_writer().url).attributes
    check_compatibility(attrs, {"levels": [("p3", 8, 4)], "preprocessing": {"pixel_mean": (1, 2, 3)}})
    with pytest.raises(CacheError) as info:
        check_compatibility(
            attrs,
            {
                "levels": [("p3", 4, 4), ("p4", 16, 256), ("p6", 64, 4)],
                "preprocessing": {"pixel_mean": [1, 2, 4], "size_divisibility": 32},
            },
        )
    text = str(info.value)
    assert "level p3 stride: cache 8, student 4" in text
    assert "level p4 channels: cache 4, student 256" in text
    assert "level p6: the student needs it" in text
    assert "preprocessing.size_divisibility: cache '<missing>', student 32" in text
    # normalisation is each model's own (docs/D2_INTEROP.md): an older cache's pixel_mean is not compared
    assert "pixel_mean" not in text
