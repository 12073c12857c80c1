"""`icd cache inspect|verify|plan|repack`: output, exit codes (0 ok, 1 verify failures, 2 bad input),
and repack fp16 -> int8 preserving identity, teacher weights and exactly the committed samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache_format import CacheReader, CacheWriter, LevelSpec, SampleMeta
from cache_format.cli import main
from cache_format.integrity import finish_cache
from cache_format.synthetic import fpn_like_features

LEVELS = [LevelSpec("p3", 8, 8, 10, 10), LevelSpec("p4", 16, 8, 5, 5)]
IDENTITY = {
    "teacher": {"architecture": "retinanet", "weights_sha256": "ab12"},
    "preprocessing": {"pixel_mean": [103.5, 116.3, 123.7]},
    "dataset": {"name": "synth"},
    "augmentation": {"seed": 3, "num_variants": 2},
}


def _sample(i: int):
    rng = np.random.default_rng(i)
    rh, rw = 80 - 2 * i, 70
    return (
        fpn_like_features(rng, LEVELS, rh, rw),
        SampleMeta(i, i % 2, 1.25, bool(i % 2), rh, rw),
        np.full((i % 3, 4), float(i), np.float32),
        np.arange(i % 3, dtype=np.int64),
    )


@pytest.fixture
def cache(tmp_path: Path) -> str:
    """A fp16 cache of 7 samples, 6 committed (sample 5 missing, so shard 2 = [4, 5] is partial)."""
    url = str(tmp_path / "cache")
    w = CacheWriter.create(
        url, num_samples=7, levels=LEVELS, encoding="fp16", attributes=IDENTITY, shard_samples=2, tile=4
    )
    for i in (0, 1, 2, 3, 4, 6):
        w.write_sample(i, *_sample(i))
    w.put_teacher_weights({"head.w": np.arange(6, dtype=np.float32)})
    w.close()
    finish_cache(url)  # a finished dump that skipped sample 5 (as stage one skips an unreadable image)
    return url


def test_inspect(cache, capsys):
    assert main(["inspect", cache]) == 0
    out = capsys.readouterr().out
    assert "6 committed / 7 total" in out and "encoding fp16" in out and "compression ratio" in out
    assert "retinanet" in out and "p3" in out and "1 weight tensors" in out
    assert main(["inspect", cache, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples_committed"] == 6 and info["levels"][0]["array_shape"] == [7, 8, 10, 10]
    assert info["compression_ratio_vs_fp32"] > 1.0 and info["files"] > 0


def test_verify_exit_codes(cache, tmp_path, capsys):
    assert main(["verify", cache, "--workers", "2"]) == 0
    assert "6/7 samples committed" in capsys.readouterr().out
    shard = tmp_path / "cache" / "features" / "p4" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x55
    shard.write_bytes(bytes(data))
    assert main(["verify", cache]) == 1
    out = capsys.readouterr().out
    assert "BAD features/p4/c/1/0/0/0: shard 1, sample" in out and "level p4" in out
    assert cache not in out.split("\n", 1)[1]  # the location is said once, in the head line


@pytest.mark.parametrize(
    "argv_tail,match",
    [
        (["verify", "{missing}"], "is not a cache"),
        (["inspect", "{missing}"], "is not a cache"),
        (["plan", "--calib", "{cache}", "--samples", "10", "--budget", "lots"], "cannot parse size 'lots'"),
        (
            ["plan", "--calib", "{cache}", "--samples", "100000", "--budget", "1MB", "--candidates", "fp16,int8"],
            "no encoding fits the budget",
        ),
        (["repack", "{cache}", "{out}", "--encoding", "int4"], "unknown encoding 'int4'"),
        (["verify", "{cache}", "--workers", "0"], "must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_a_message(cache, tmp_path, capsys, argv_tail, match):
    fill = {"missing": str(tmp_path / "nope"), "cache": cache, "out": str(tmp_path / "out")}
    assert main([a.format(**fill) for a in argv_tail]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"icd cache {argv_tail[0]}: error: ") and match in err and "fix:" in err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0


def test_plan_prints_the_table_and_choice(cache, capsys):
    assert (
        main(
            [
                "plan",
                "--calib",
                cache,
                "--samples",
                "1000",
                "--budget",
                "10GB",
                "--calib-samples",
                "3",
                "--candidates",
                "fp32,fp16,int8@blosc-lz4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "int8@blosc-lz4" in out and "measured on 3 calibration samples" in out
    # The calibration cache is fp16, so fp16 reproduces it exactly: as faithful as fp32 and smaller.
    assert "choice: fp16@zstd" in out and "already rounded" in out


def test_repack_fp16_to_int8_preserves_identity_and_committed_samples(cache, tmp_path, capsys):
    dst = str(tmp_path / "int8")
    assert main(["repack", cache, dst, "--encoding", "int8", "--compressor", "blosc-lz4", "--workers", "2"]) == 0
    assert "repacked 6 committed samples" in capsys.readouterr().out
    src_r, dst_r = CacheReader(cache), CacheReader(dst)
    assert dst_r.encoding == "int8" and dst_r.compressor == "blosc-lz4"
    for key in IDENTITY:
        assert dst_r.attributes[key] == src_r.attributes[key]
    assert dst_r.levels == src_r.levels and dst_r.layout == src_r.layout
    assert dst_r.committed().tolist() == src_r.committed().tolist() == [True] * 5 + [False, True]
    for i in (0, 1, 2, 3, 4, 6):
        a, b = src_r.read_sample(i), dst_r.read_sample(i)
        assert a.meta == b.meta and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.classes, b.classes)
        for name in a.features:
            x = a.features[name]
            span = np.ptp(x.reshape(x.shape[0], -1), axis=1).max()
            assert np.abs(b.features[name] - x).max() <= span / 510 * 1.001 + 1e-6
    assert np.array_equal(dst_r.teacher_weights()["head.w"], np.arange(6, dtype=np.float32))
    assert main(["verify", dst]) == 0
    assert main(["repack", cache, dst, "--encoding", "int8"]) == 2  # exists: refuses
    assert main(["repack", cache, dst, "--encoding", "bf16", "--overwrite"]) == 0
    assert CacheReader(dst).encoding == "bf16"
