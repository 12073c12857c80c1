"""Create and open the zarr arrays of a cache (features, records, quant, instances).

Every array is chunked so that one chunk (or one shard) belongs to exactly one feature shard of
`shard_samples` samples: writers owning disjoint shards therefore never write the same object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from cache_format.compressors import compressor_codecs
from cache_format.encodings import Encoding
from cache_format.errors import CorruptChunkError
from cache_format.schema import (
    BOXES_ARRAY,
    CLASSES_ARRAY,
    FEATURES_GROUP,
    QUANT_ARRAY,
    RECORD_FIELDS,
    RECORDS_ARRAY,
    Layout,
    LevelSpec,
    quant_columns,
)

_NO_EMPTY = {"write_empty_chunks": False}


@dataclass
class CacheArrays:
    """Handles on a cache's arrays; `quant` is None unless the encoding is quantized."""

    features: dict[str, zarr.Array]
    records: zarr.Array
    quant: zarr.Array | None
    boxes: zarr.Array
    classes: zarr.Array


def _meta_codecs() -> list:
    return [ZstdCodec(level=3), Crc32cCodec()]


def create_arrays(
    root: zarr.Group, levels: list[LevelSpec], layout: Layout, encoding: Encoding, compressor: str
) -> CacheArrays:
    """Create every array of an empty cache (metadata only: no chunk is written)."""
    n, s = layout.num_samples, layout.shard_samples
    features = {}
    for lv in levels:
        th, tw = layout.level_tile(lv)
        features[lv.name] = root.create_array(
            f"{FEATURES_GROUP}/{lv.name}",
            shape=(n, lv.channels, lv.max_h, lv.max_w),
            chunks=(1, lv.channels, th, tw),
            shards=layout.level_shard(lv),
            dtype=encoding.stored_dtype,
            fill_value=0,
            compressors=compressor_codecs(compressor, encoding.stored_dtype),
            dimension_names=("sample", "channel", "y", "x"),
            config=_NO_EMPTY,
        )
    width = len(RECORD_FIELDS) + len(levels)
    records = root.create_array(
        RECORDS_ARRAY,
        shape=(n, width),
        chunks=(s, width),
        dtype="float64",
        fill_value=np.nan,
        compressors=_meta_codecs(),
        dimension_names=("sample", "field"),
        config=_NO_EMPTY,
        attributes={"fields": list(RECORD_FIELDS) + [f"crc_{lv.name}" for lv in levels]},
    )
    quant = None
    if encoding.quantized:
        cols = quant_columns(levels)
        width = sum(b - a for a, b in cols.values())
        quant = root.create_array(
            QUANT_ARRAY,
            shape=(n, width),
            chunks=(s, width),
            dtype="float32",
            fill_value=np.nan,
            compressors=_meta_codecs(),
            config=_NO_EMPTY,
            dimension_names=("sample", "column"),
            attributes={"columns": {k: list(v) for k, v in cols.items()}},
        )
    rows = layout.instance_rows_per_shard
    boxes = root.create_array(
        BOXES_ARRAY,
        shape=(layout.num_shards * rows, 4),
        chunks=(rows, 4),
        dtype="float32",
        fill_value=0.0,
        compressors=_meta_codecs(),
        config=_NO_EMPTY,
        dimension_names=("row", "xyxy"),
    )
    classes = root.create_array(
        CLASSES_ARRAY,
        shape=(layout.num_shards * rows,),
        chunks=(rows,),
        dtype="int64",
        fill_value=0,
        compressors=_meta_codecs(),
        config=_NO_EMPTY,
        dimension_names=("row",),
    )
    return CacheArrays(features, records, quant, boxes, classes)


def open_arrays(
    root: zarr.Group,
    levels: list[LevelSpec],
    encoding: Encoding,
    url: str,
    layout: Layout | None = None,
    compressor: str | None = None,
) -> CacheArrays:
    """Open the arrays of an existing cache; a missing one means a truncated store.

    With `layout` (the root's), the arrays' shapes and chunking must agree with it: an edited count
    (root `num_samples` 48 -> 40) or shape raises CorruptChunkError naming the metadata document; with
    `compressor` too, so must their codecs (codec_problems).
    """

    def get(path: str) -> zarr.Array:
        try:
            node = root[path]
        except KeyError:
            raise CorruptChunkError(
                f"cache {url} is truncated: array '{path}' is missing",
                "restore the store from a complete copy or re-create it with `icd dump`",
                key=f"{path}/zarr.json",
            ) from None
        if not isinstance(node, zarr.Array):
            raise CorruptChunkError(
                f"cache {url}: '{path}' is not an array", "the store is damaged; re-create it", key=f"{path}/zarr.json"
            )
        return node

    features = {lv.name: get(f"{FEATURES_GROUP}/{lv.name}") for lv in levels}
    for lv in levels:
        arr = features[lv.name]
        if arr.shape[1:] != (lv.channels, lv.max_h, lv.max_w) or arr.dtype != encoding.stored_dtype:
            raise CorruptChunkError(
                f"cache {url}: features/{lv.name} has shape {arr.shape} dtype {arr.dtype}, "
                f"the attributes say {lv} with {encoding.stored_dtype}",
                "the store is damaged; restore the file or re-create the cache",
                key=f"{FEATURES_GROUP}/{lv.name}/zarr.json",
            )
    quant = get(QUANT_ARRAY) if encoding.quantized else None
    arrays = CacheArrays(features, get(RECORDS_ARRAY), quant, get(BOXES_ARRAY), get(CLASSES_ARRAY))
    if layout is not None:
        problems = layout_problems(arrays, levels, layout)
        if not problems and compressor is not None:
            problems = codec_problems(arrays, levels, layout, encoding, compressor)
        if problems:
            key, message = problems[0]
            raise CorruptChunkError(
                f"cache {url}: {key}: {message}",
                "restore that file from a copy of the cache (or re-create the cache)",
                key=key,
            )
    return arrays


def layout_problems(arrays: CacheArrays, levels: list[LevelSpec], layout: Layout) -> list[tuple[str, str]]:
    """(metadata document, problem) where the arrays' shapes or chunking disagree with the root's layout.

    When every per-sample array agrees on a count the root does not (an edited root `num_samples` or
    `shard_samples`), the root's zarr.json is named once; otherwise each disagreeing array's.
    """
    problems: list[tuple[str, str]] = []
    per_sample = [*arrays.features.values(), arrays.records] + ([arrays.quant] if arrays.quant is not None else [])
    n, s = layout.num_samples, layout.shard_samples
    counts = {a.shape[0] for a in per_sample}
    if len(counts) == 1 and n not in counts:
        problems.append(
            ("zarr.json", f"num_samples is {n} but every array holds {counts.pop()} samples (an edited count)")
        )
        n = per_sample[0].shape[0]
    blocks = {(a.shards or a.chunks)[0] for a in per_sample}
    if len(blocks) == 1 and s not in blocks:
        problems.append(("zarr.json", f"shard_samples is {s} but every array is chunked by {blocks.pop()} samples"))
        s = (per_sample[0].shards or per_sample[0].chunks)[0]
    rows = -(-n // s) * s * layout.instance_capacity  # num_shards * instance rows per shard
    width = len(RECORD_FIELDS) + len(levels)
    expected = {arrays.records.path: ((n, width), s)}
    if arrays.quant is not None:
        expected[arrays.quant.path] = ((n, sum(b - a for a, b in quant_columns(levels).values())), s)
    for lv in levels:
        expected[arrays.features[lv.name].path] = ((n, lv.channels, lv.max_h, lv.max_w), s)
    expected[arrays.boxes.path] = ((rows, 4), s * layout.instance_capacity)
    expected[arrays.classes.path] = ((rows,), s * layout.instance_capacity)
    by_path = {a.path: a for a in [*per_sample, arrays.boxes, arrays.classes]}
    for path, (shape, block) in expected.items():
        arr = by_path[path]
        got_block = (arr.shards or arr.chunks)[0]
        if tuple(arr.shape) != shape or got_block != block:
            problems.append(
                (
                    f"{path}/zarr.json",
                    f"shape {list(arr.shape)} in blocks of {got_block}, but the "
                    f"root's layout needs shape {list(shape)} in blocks of {block}",
                )
            )
    return problems


def codec_problems(
    arrays: CacheArrays, levels: list[LevelSpec], layout: Layout, encoding: Encoding, compressor: str
) -> list[tuple[str, str]]:
    """(metadata document, problem) for each array whose stored dtype, codecs or chunk key encoding differ
    from what this cache's root attributes (encoding, compressor) make a writer create.

    Why: an edited codec list (a crc32c codec removed from features/p3/zarr.json) otherwise shows up only
    as every chunk of that array failing to decode, blamed on intact chunks, and a repair would rewrite
    them under the edited list. The expected metadata is create_arrays' own, built in memory.
    """
    expected = create_arrays(
        zarr.open_group(zarr.storage.MemoryStore(), mode="w"), levels, layout, encoding, compressor
    )
    pairs = [(arrays.features[lv.name], expected.features[lv.name]) for lv in levels]
    pairs += [(arrays.records, expected.records), (arrays.boxes, expected.boxes), (arrays.classes, expected.classes)]
    if arrays.quant is not None and expected.quant is not None:
        pairs.append((arrays.quant, expected.quant))
    problems = []
    for have, want in pairs:
        got, ref = have.metadata.to_dict(), want.metadata.to_dict()
        for field in ("data_type", "codecs", "chunk_key_encoding"):
            if json.dumps(got.get(field), sort_keys=True, default=str) != json.dumps(
                ref.get(field), sort_keys=True, default=str
            ):
                problem = (
                    f"its {field} is {_short(got.get(field))}, but the cache's encoding {encoding.name} and "
                    f"compressor {compressor} specify {_short(ref.get(field))} (an edited metadata file)"
                )
                problems.append((f"{have.path}/zarr.json", problem))
                break
    return problems


def _short(value) -> str:
    """A codec list as names ('bytes, zstd, crc32c'; sharding shows its inner codecs), else the value."""
    value = json.loads(json.dumps(value, default=str))  # zarr's to_dict may hold tuples and codec objects
    if isinstance(value, list):
        names = []
        for codec in value:
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                inner = codec.get("configuration", {}).get("codecs", [])
                names.append("sharding" + _short(inner))
            else:
                names.append(codec.get("name", "?") if isinstance(codec, dict) else str(codec))
        return "[" + ", ".join(names) + "]"
    return json.dumps(value, default=str)
