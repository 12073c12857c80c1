"""`icd cache inspect`: what a cache holds, how much of it is written and what it costs on disk."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cache_format.reader import CacheReader
from cache_format.schema import COL, RESERVED_ATTRIBUTES, level_size
from cache_format.store import usage


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} TB"


def summarize(url: str) -> dict[str, Any]:
    """A JSON-able description of the cache at `url`."""
    reader = CacheReader(url)
    records = reader.records()
    committed = records[:, COL["committed"]] == 1.0
    rh = records[committed, COL["resized_h"]]
    rw = records[committed, COL["resized_w"]]
    fp32_bytes = 0
    levels = []
    for lv in reader.levels:
        h, w = level_size(rh.astype(np.int64), rw.astype(np.int64), lv.stride)
        fp32_bytes += int((h * w).sum()) * lv.channels * 4
        arr = reader.feature_array(lv.name)
        levels.append(
            {
                "name": lv.name,
                "stride": lv.stride,
                "channels": lv.channels,
                "array_shape": list(arr.shape),
                "chunk": list(arr.chunks),
                "shard": list(arr.shards or ()),
                "valid_h_range": [int(h.min()), int(h.max())] if len(h) else None,
                "valid_w_range": [int(w.min()), int(w.max())] if len(w) else None,
            }
        )
    files, on_disk = usage(reader.url)
    _, feature_bytes = usage(reader.url, "features")
    weights = reader.teacher_weight_sizes() if reader.has_teacher_weights() else {}
    return {
        "url": reader.url,
        "format_version": reader.attributes["format_version"],
        "encoding": reader.encoding,
        "compressor": reader.compressor,
        "samples_committed": int(committed.sum()),
        "samples_total": reader.num_samples,
        "shard_samples": reader.layout.shard_samples,
        "tile": reader.layout.tile,
        "levels": levels,
        "bytes_on_disk": on_disk,
        "files": files,
        "fp32_equivalent_bytes": fp32_bytes,
        "feature_bytes": feature_bytes,
        "compression_ratio_vs_fp32": (fp32_bytes / feature_bytes) if feature_bytes else None,
        "teacher_weights": {"tensors": len(weights), "bytes": int(sum(weights.values()))},
        "identity": {k: v for k, v in reader.attributes.items() if k not in RESERVED_ATTRIBUTES},
    }


def format_summary(info: dict[str, Any]) -> str:
    ratio = info["compression_ratio_vs_fp32"]
    lines = [
        f"cache        {info['url']}",
        f"format       {info['format_version']}   encoding {info['encoding']}   compressor {info['compressor']}",
        f"samples      {info['samples_committed']} committed / {info['samples_total']} total "
        f"({info['shard_samples']} per shard, tile {info['tile']})",
        f"on disk      {_fmt_bytes(info['bytes_on_disk'])} in {info['files']} files",
        f"features     {_fmt_bytes(info['feature_bytes'])} for {_fmt_bytes(info['fp32_equivalent_bytes'])} of fp32 "
        "values" + (f" (compression ratio {ratio:.2f}x vs fp32)" if ratio else ""),
        f"teacher      {info['teacher_weights']['tensors']} weight tensors "
        f"({_fmt_bytes(info['teacher_weights']['bytes'])})",
        "levels:",
    ]
    for lv in info["levels"]:
        lines.append(
            f"  {lv['name']:<6} stride {lv['stride']:<4} C {lv['channels']:<5} array {lv['array_shape']} "
            f"chunk {lv['chunk']} shard {lv['shard']} valid h {lv['valid_h_range']} w {lv['valid_w_range']}"
        )
    lines.append("identity:")
    for key, value in info["identity"].items():
        lines.append(f"  {key}: {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines)
