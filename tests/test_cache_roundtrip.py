"""Round trips through the cache: bit-exact fp32, lossy encodings within their documented bounds,
ragged and empty instances, stores by URL, teacher weights, visibility only after a shard is written."""

from __future__ import annotations

import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest

from cache_format import CacheReader, CacheWriter, LevelSpec, SampleMeta
from cache_format.encodings import parse_encoding
from cache_format.synthetic import fpn_like_features

LEVELS = [LevelSpec("p3", 8, 8, 13, 13), LevelSpec("p4", 16, 8, 7, 7), LevelSpec("p5", 32, 4, 4, 4)]
SIZES = [(100, 76), (64, 100), (97, 33), (40, 40), (100, 100)]


def _url(tag: str) -> str:
    return f"memory://test-cache-{tag}-{uuid.uuid4().hex}"


def _sample(i: int):
    rng = np.random.default_rng(i)
    rh, rw = SIZES[i % len(SIZES)]
    feats = fpn_like_features(rng, LEVELS, rh, rw)
    n = i % 3  # 0, 1 or 2 instances: zero-instance samples included
    boxes = rng.uniform(0, 50, (n, 4)).astype(np.float32)
    classes = rng.integers(1, 80, n).astype(np.int64)
    meta = SampleMeta(image_id=1000 + i, variant=i % 2, scale=0.5 + i / 7, flip=bool(i % 2), resized_h=rh, resized_w=rw)
    return feats, meta, boxes, classes


def _write(url: str, encoding: str, n: int = 7, compressor: str = "zstd", **kw) -> CacheWriter:
    w = CacheWriter.create(
        url,
        num_samples=n,
        levels=LEVELS,
        encoding=encoding,
        compressor=compressor,
        attributes={"teacher": {"arch": "tiny"}},
        shard_samples=3,
        tile=8,
        **kw,
    )
    for i in w.owned_samples():
        w.write_sample(i, *_sample(i))
    w.close()
    return w


def test_fp32_round_trip_is_bit_exact_with_meta_and_instances():
    url = _url("fp32")
    _write(url, "fp32")
    r = CacheReader(url)
    assert r.committed().all() and r.num_samples == 7
    assert r.attributes["teacher"] == {"arch": "tiny"} and r.attributes["format_version"] == "1.1"
    for i in range(7):
        feats, meta, boxes, classes = _sample(i)
        got = r.read_sample(i)
        assert got.meta == meta
        for name, x in feats.items():
            assert got.features[name].dtype == np.float32
            assert got.features[name].shape == x.shape
            assert np.array_equal(got.features[name].view(np.uint32), x.view(np.uint32))
        assert got.boxes.dtype == np.float32 and got.boxes.shape == (i % 3, 4)
        assert np.array_equal(got.boxes, boxes) and np.array_equal(got.classes, classes)
        assert got.classes.dtype == np.int64


@pytest.mark.parametrize(
    "encoding,compressor",
    [
        ("fp16", "zstd"),
        ("bf16", "blosc-lz4"),
        ("int8", "zstd:1"),
        ("fp16+bitround5", "blosc-zstd-bitshuffle"),
        ("fp32+bitround12", "zstd"),
        ("bf16+bitround4", "none"),
        ("int8", "blosc-lz4-shuffle"),
    ],
)
def test_lossy_encodings_stay_within_documented_bound(encoding, compressor):
    url = _url(encoding)
    _write(url, encoding, compressor=compressor)
    r = CacheReader(url)
    enc = parse_encoding(encoding)
    for i in range(7):
        feats = _sample(i)[0]
        got = r.read_sample(i).features
        for name, x in feats.items():
            quant = None
            if enc.quantized:
                quant = enc.encode(x)[1]
            bound = enc.error_bound(x, quant)
            err = np.abs(got[name].astype(np.float64) - x)
            assert (err <= bound).all(), (name, float((err - bound).max()))
            assert err.max() > 0  # lossy really is lossy here: the test could fail


def test_int8_bound_holds_on_hard_channels():
    enc = parse_encoding("int8")
    rng = np.random.default_rng(3)
    x = np.stack(
        [
            np.full((5, 6), 3.25, np.float32),  # constant channel: exact
            (1e4 + rng.standard_normal((5, 6))).astype(np.float32),  # large offset, small range
            (rng.standard_normal((5, 6)) * 1e-6).astype(np.float32),  # tiny values
            np.where(rng.random((5, 6)) > 0.9, 50.0, -0.01).astype(np.float32),  # outliers
        ]
    )
    q, quant = enc.encode(x)
    y = enc.decode(q, quant)
    assert np.array_equal(y[0], x[0])
    assert (np.abs(y.astype(np.float64) - x) <= enc.error_bound(x, quant)).all()


def test_fp16_refuses_values_beyond_its_range():
    from cache_format import CacheError

    with pytest.raises(CacheError, match="fp16"):
        parse_encoding("fp16").encode(np.full((1, 2, 2), 1e5, np.float32))
    with pytest.raises(CacheError, match="NaN"):
        parse_encoding("fp32").encode(np.full((1, 2, 2), np.nan, np.float32))


def test_bf16_rounds_to_nearest_even():
    enc = parse_encoding("bf16")
    # 1 + 2^-8 is exactly halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -2.5, 0.0], np.float32).reshape(1, 2, 2)
    y = enc.decode(enc.encode(x)[0]).ravel()
    assert list(y) == [1.0, 1 + 2**-6, -2.5, 0.0]


def test_samples_are_invisible_until_their_shard_is_written_and_partial_shards_on_close():
    url = _url("vis")
    w = CacheWriter.create(url, num_samples=5, levels=LEVELS, encoding="fp16", attributes={}, shard_samples=3, tile=8)
    r = CacheReader(url)
    w.write_sample(0, *_sample(0))
    w.write_sample(1, *_sample(1))
    assert not r.committed().any()  # buffered: shard 0 is not complete
    w.write_sample(2, *_sample(2))  # completes shard 0 -> written
    assert r.committed().tolist() == [True, True, True, False, False]
    w.write_sample(3, *_sample(3))
    assert w.uncommitted_owned_samples() == [4]
    w.close()  # partial shard 1 (sample 3) written
    assert r.committed().tolist() == [True, True, True, True, False]
    assert r.read_sample(3).meta == _sample(3)[1]
    with pytest.raises(Exception, match="not committed"):
        r.read_sample(4)
    assert w.bytes_written > 0


def test_teacher_weights_round_trip():
    url = _url("weights")
    w = _write(url, "fp16", n=3)
    state = {
        "fpn.inner.0.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        "head.cls.bias": np.array([-4.6, 0.1], np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }
    w.put_teacher_weights(state)
    got = CacheReader(url).teacher_weights()
    assert list(got) == list(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v)


@pytest.mark.parametrize("scheme", ["path", "file"])
def test_local_paths_and_file_urls(tmp_path, scheme):
    path = tmp_path / "cache"
    url = str(path) if scheme == "path" else f"file://{path}"
    _write(url, "int8", n=4)
    r = CacheReader(str(path))
    assert r.committed().all()
    assert np.allclose(r.read_level(2, "p4"), _sample(2)[0]["p4"], atol=0.1)
    assert (path / "features" / "p3" / "c" / "0" / "0" / "0" / "0").is_file()  # one object per shard


def test_reader_pickles_by_url():
    url = _url("pickle")
    _write(url, "fp32", n=3)
    r = pickle.loads(pickle.dumps(CacheReader(url)))
    assert np.array_equal(r.read_level(1, "p5"), _sample(1)[0]["p5"])


def test_padding_tiles_are_never_written():
    url = _url("pad")
    w = CacheWriter.create(
        url,
        num_samples=1,
        levels=[LevelSpec("p3", 8, 2, 32, 32)],
        encoding="fp32",
        compressor="none",
        attributes={},
        shard_samples=1,
        tile=8,
    )
    w.write_sample(0, {"p3": np.ones((2, 5, 9), np.float32)}, SampleMeta(0, 0, 1.0, False, 40, 72))
    w.close()
    from cache_format.store import key_sizes

    arr = CacheReader(url).feature_array("p3")
    # The 5x9 valid region touches 2 of the 16 8x8 tiles: the shard holds those two raw chunks
    # (2*8*8 float32 + crc32c each) and the index (16 chunks x 16 bytes + crc32c), nothing else.
    assert key_sizes(arr.store, ["features/p3/c/0/0/0/0"])["features/p3/c/0/0/0/0"] == 2 * (2 * 8 * 8 * 4 + 4) + (
        16 * 16 + 4
    )


def test_importing_cache_format_does_not_import_torch():
    code = (
        "import sys, cache_format, cache_format.cli, cache_format.budget, cache_format.verify, "
        "cache_format.repack, cache_format.summary; print('torch' in sys.modules, 'detection' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("encoding", ["fp16", "bf16", "int8"])
def test_stored_arrays_decode_like_the_reader(encoding):
    url = _url("stored-" + encoding)
    _write(url, encoding, n=4)
    r = CacheReader(url)
    enc = parse_encoding(encoding)
    raw = r.read_sample(2, decode=False)
    full = r.read_sample(2)
    assert (raw.quant is not None) == enc.quantized and full.quant is None
    for name, stored in raw.features.items():
        assert stored.dtype == enc.stored_dtype
        q = raw.quant[name] if raw.quant else None
        assert np.array_equal(enc.decode(stored, q), full.features[name])


def test_resume_completes_a_partially_committed_shard_without_touching_committed_samples():
    url = _url("resume")
    w = CacheWriter.create(url, num_samples=6, levels=LEVELS, encoding="int8", attributes={}, shard_samples=3, tile=8)
    for i in (0, 1, 2, 4):  # shard 1 = [3, 4, 5]: only sample 4 buffered, written by close()
        w.write_sample(i, *_sample(i))
    w.close()
    before = CacheReader(url).read_sample(4)
    w = CacheWriter.open(url)
    assert w.uncommitted_owned_samples() == [3, 5]
    w.write_sample(5, *_sample(5))  # shard still incomplete (3 missing): stays buffered
    assert not CacheReader(url).committed()[5]
    w.write_sample(3, *_sample(3))  # completes shard 1: rewrites it around committed sample 4
    r = CacheReader(url)
    assert r.committed().all()
    after = r.read_sample(4)
    for name in before.features:
        assert np.array_equal(before.features[name], after.features[name])
    assert np.array_equal(before.boxes, after.boxes) and np.array_equal(before.classes, after.classes)
    for i in (3, 5):
        feats, meta, boxes, classes = _sample(i)
        got = r.read_sample(i)
        assert got.meta == meta and np.array_equal(got.boxes, boxes) and np.array_equal(got.classes, classes)
        assert all(np.abs(got.features[k] - feats[k]).max() < 0.1 for k in feats)
