"""Budget planning: size strings, measured candidates, the most faithful fitting choice, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from cache_format import CacheError, LevelSpec, SampleMeta
from cache_format.budget import parse_size, plan
from cache_format.synthetic import fpn_like_features

LEVELS = [LevelSpec("p3", 8, 16, 12, 12), LevelSpec("p4", 16, 16, 6, 6)]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("200GB", 200 * 10**9),
        ("1.5TiB", int(1.5 * 2**40)),
        ("500M", 500 * 10**6),
        ("10 kib", 10240),
        ("123", 123),
        ("2g", 2 * 10**9),
        (".5MB", 500_000),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "12 parsecs", "1.2.3GB", "-5GB", "0", "ten GB"])
def test_parse_size_rejects_with_accepted_forms(text):
    with pytest.raises(CacheError) as info:
        parse_size(text)
    assert "GiB" in info.value.fix and "200GB" in info.value.fix


def _calibration(n: int = 4):
    out, metas = [], []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        rh, rw = 90 - 3 * i, 80 + 2 * i
        out.append(fpn_like_features(rng, LEVELS, rh, rw))
        metas.append(SampleMeta(i, 0, 1.0, False, rh, rw))
    return out, metas


def test_planner_picks_the_most_faithful_candidate_that_fits():
    calib, metas = _calibration()
    candidates = ["fp32", "fp16", "int8"]
    roomy = plan(calib, 1000, "1TB", candidates, levels=LEVELS, metas=metas)
    by_name = {c.encoding: c for c in roomy.candidates}
    assert roomy.choice.encoding == "fp32" and by_name["fp32"].worst_rel_rmse == 0.0
    # measured, so ordered by size and fidelity as the encodings imply
    assert by_name["fp32"].bytes_per_sample > by_name["fp16"].bytes_per_sample > by_name["int8"].bytes_per_sample
    assert 0 < by_name["fp16"].worst_rel_rmse < by_name["int8"].worst_rel_rmse < 0.05
    assert by_name["int8"].max_abs["p3"] > 0
    # A budget between fp16's and fp32's projected size picks fp16; between int8's and fp16's picks int8.
    mid = (by_name["fp16"].projected_bytes + by_name["fp32"].projected_bytes) // 2
    assert plan(calib, 1000, mid, candidates, levels=LEVELS, metas=metas).choice.encoding == "fp16"
    low = (by_name["int8"].projected_bytes + by_name["fp16"].projected_bytes) // 2
    chosen = plan(calib, 1000, low, candidates, levels=LEVELS, metas=metas)
    assert chosen.choice.encoding == "int8"
    assert "int8@zstd" in chosen.table() and "<- chosen" in chosen.table()


def test_planner_refuses_with_the_numbers_when_nothing_fits():
    calib, metas = _calibration(2)
    with pytest.raises(CacheError) as info:
        plan(calib, 10**6, "1MB", ["fp16", "int8@blosc-lz4"], levels=LEVELS, metas=metas)
    text = str(info.value)
    assert "no encoding fits the budget: 1000000 samples in 1.00 MB allow 1 B per sample" in text
    assert "the smallest candidate" in text and "fp16@zstd" in text and "int8@blosc-lz4" in text
    assert "raise the budget" in info.value.fix


def test_planner_infers_the_resized_size_from_level_shapes():
    calib, _ = _calibration(2)
    p = plan(calib, 10, "1GB", ["int8"], levels=LEVELS)
    assert p.choice.encoding == "int8"
    bad = [{"p3": np.ones((16, 12, 10), np.float32), "p4": np.ones((16, 2, 5), np.float32)}]
    with pytest.raises(CacheError, match="not those of one image"):
        plan(bad, 10, "1GB", ["int8"], levels=LEVELS)
