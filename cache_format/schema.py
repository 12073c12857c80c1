"""The cache's schema: format version, level and sample records, array names and their layout.

Everything that both the writer and the reader must agree on lives here, so that SPEC.md has one
place in code to match. See SPEC.md for the prose version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cache_format.errors import CacheError

# 1.1 adds (minor: 1.0 readers ignore it) the manifest a finished dump writes last, per-tensor checksums
# of the teacher weights and the root's creation marker; SPEC.md, Versioning.
FORMAT_VERSION = "1.1"
FORMAT_NAME = "icd-teacher-cache"
# The first version whose finished caches carry a manifest.
MANIFEST_SINCE = (1, 1)

# Array paths inside the root group.
FEATURES_GROUP = "features"
RECORDS_ARRAY = "samples/records"
QUANT_ARRAY = "samples/quant"
BOXES_ARRAY = "instances/boxes"
CLASSES_ARRAY = "instances/classes"
WEIGHTS_GROUP = "teacher_weights"
# A group whose attributes are the manifest: written last by a finished dump (SPEC.md, Manifest).
MANIFEST_GROUP = "manifest"
# Root attribute present only while a cache is being created (replaced by the format keys at the end):
# a store holding it is an interrupted creation, which `icd dump` may start over.
CREATING_ATTRIBUTE = "icd_cache_creating"

# Root attribute keys written by the format itself; caller attributes may not use them.
RESERVED_ATTRIBUTES = (
    "format",
    "format_version",
    "levels",
    "encoding",
    "compressor",
    "num_samples",
    "shard_samples",
    "tile",
    "instance_capacity",
    "record_fields",
)

# Columns of samples/records (float64 [num_samples, len(RECORD_FIELDS) + num_levels]). Every value
# is an integer below 2**53 or a float64, so float64 holds each exactly. The per-level crc32c
# columns follow, one per level in `levels` order.
RECORD_FIELDS = (
    "committed",
    "image_id",
    "variant",
    "scale",
    "flip",
    "resized_h",
    "resized_w",
    "instance_start",
    "instance_count",
    "instance_crc",
)
COL = {name: i for i, name in enumerate(RECORD_FIELDS)}


def level_size(height: Any, width: Any, stride: int) -> tuple[Any, Any]:
    """The size of an FPN level of `stride` over an image of (height, width): (ceil(h / s), ceil(w / s)).

    The one place this rule is written: a sample's valid region per level (what stage one stores), a
    padded batch's level shape (what stage two pads to) and ICD's padding mask all use it. Integer
    arithmetic (no float rounding); works element-wise on numpy arrays too.
    """
    return -(-height // stride), -(-width // stride)


@dataclass(frozen=True)
class LevelSpec:
    """One FPN level: its name, stride, channel count and the largest valid size it will hold."""

    name: str
    stride: int
    channels: int
    max_h: int
    max_w: int

    def valid_size(self, resized_h: int, resized_w: int) -> tuple[int, int]:
        """The level's valid (h, w) for a sample of the given resized size."""
        return level_size(resized_h, resized_w, self.stride)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LevelSpec:
        return cls(str(d["name"]), int(d["stride"]), int(d["channels"]), int(d["max_h"]), int(d["max_w"]))


@dataclass(frozen=True)
class SampleMeta:
    """What a cached sample was made from: the image, its augmentation variant and its resized size."""

    image_id: int
    variant: int
    scale: float
    flip: bool
    resized_h: int
    resized_w: int


@dataclass
class CachedSample:
    """One committed sample as read back: features per level [C, h, w], meta and instances.

    Features are float32 unless read with decode=False: then they are the stored arrays (float32,
    float16, bfloat16 bits as uint16, or int8) and `quant` holds each int8 level's [2, C] (scale;
    offset), so the decode can run on an accelerator (SPEC.md, Encodings).
    """

    index: int
    features: dict[str, np.ndarray]
    meta: SampleMeta
    boxes: np.ndarray  # [n, 4] float32 xyxy in the sample's pixel frame
    classes: np.ndarray  # [n] int64
    quant: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class Layout:
    """Chunking shared by all arrays: samples per shard and the spatial tile of a feature chunk."""

    num_samples: int
    shard_samples: int
    tile: int
    instance_capacity: int  # instance rows per shard = shard_samples * instance_capacity

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_samples)

    def shard_of(self, index: int) -> int:
        return index // self.shard_samples

    def shard_range(self, shard: int) -> range:
        lo = shard * self.shard_samples
        return range(lo, min(lo + self.shard_samples, self.num_samples))

    @property
    def instance_rows_per_shard(self) -> int:
        return self.shard_samples * self.instance_capacity

    def level_tile(self, level: LevelSpec) -> tuple[int, int]:
        """Inner chunk (h, w): the tile, or the whole level when it is smaller than one tile."""
        return min(self.tile, level.max_h), min(self.tile, level.max_w)

    def level_shard(self, level: LevelSpec) -> tuple[int, int, int, int]:
        """Shard shape: whole samples, the spatial extent rounded up to whole tiles."""
        th, tw = self.level_tile(level)
        return (self.shard_samples, level.channels, th * math.ceil(level.max_h / th), tw * math.ceil(level.max_w / tw))


def parse_version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(text).split("."))
    except ValueError:
        raise CacheError(
            f"cache format_version {text!r} is not 'major.minor'",
            "the store is damaged or was not written by cache_format",
        ) from None
    return major, minor


def check_version(text: str, url: str) -> None:
    """Refuse a cache whose major version is newer than this code reads."""
    major, _ = parse_version(text)
    ours, _ = parse_version(FORMAT_VERSION)
    if major > ours:
        raise CacheError(
            f"cache {url} has format version {text}, newer than the {FORMAT_VERSION} this code reads",
            "upgrade icd-cache (pip install -U icd-cache) or re-create the cache with this version",
        )


def levels_from_attributes(attrs: Mapping[str, Any]) -> list[LevelSpec]:
    return [LevelSpec.from_dict(d) for d in attrs["levels"]]


def layout_from_attributes(attrs: Mapping[str, Any]) -> Layout:
    return Layout(
        int(attrs["num_samples"]), int(attrs["shard_samples"]), int(attrs["tile"]), int(attrs["instance_capacity"])
    )


def validate_levels(levels: list[LevelSpec]) -> None:
    if not levels:
        raise CacheError("no levels given", "pass at least one LevelSpec(name, stride, channels, max_h, max_w)")
    names = [lv.name for lv in levels]
    if len(set(names)) != len(names):
        raise CacheError(f"level names repeat: {names}", "give each level a distinct name")
    for lv in levels:
        if not lv.name or "/" in lv.name:
            raise CacheError(f"level name {lv.name!r} is empty or contains '/'", "use names like 'p3'")
        if lv.stride < 1 or lv.channels < 1 or lv.max_h < 1 or lv.max_w < 1:
            raise CacheError(
                f"level {lv.name}: stride, channels, max_h, max_w must be >= 1, got {lv}",
                "compute max_h/max_w as ceil(max resized size / stride)",
            )


def quant_columns(levels: list[LevelSpec]) -> dict[str, tuple[int, int]]:
    """Column slices of samples/quant: per level, `channels` scales then `channels` offsets."""
    out: dict[str, tuple[int, int]] = {}
    start = 0
    for lv in levels:
        out[lv.name] = (start, start + 2 * lv.channels)
        start += 2 * lv.channels
    return out
