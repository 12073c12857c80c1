"""Resuming and repairing a cache: what must match, what is checked, what is rewritten.

`--resume` continues a dump from any kill point: the cache must be the same run (identity: teacher,
data, preprocessing, plan) with the same layout (sample count, CACHE.SHARD_SAMPLES, CACHE.TILE, levels,
encoding), then its damage is found cheaply (cache_format.integrity: metadata, records, every object a
committed sample needs or the manifest lists - its size, or without a manifest its shard index - the
teacher weights) and repaired: a damaged shard is made
unwritten (records first) and written again whole by the teacher, missing or damaged teacher weights are
stored again. `--repair` also reads every committed chunk first (as `icd cache verify` does), to find
flipped bytes too. Damaged metadata (a zarr.json that disagrees) cannot be recomputed: the resume is
refused naming the files to restore.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache_contract.identity import IDENTITY_FIELDS, identity_differences
from cache_format import CacheReader, CacheWriter, LevelSpec
from cache_format.compressors import validate_compressor
from cache_format.integrity import METADATA, TEACHER_WEIGHTS, check_cache, uncommit_shards
from cache_format.manifest import delete_manifest
from cache_format.store import open_store
from cache_format.weights import COMPLETE
from detection.errors import UserError


def check_resumable(url: str, wanted: dict[str, Any], cfg: Any, levels: list[LevelSpec], num_samples: int) -> str:
    """The existing cache's encoding, after checking it is the same run with the same layout."""
    reader = CacheReader(url, check_manifest=False)  # a damaged manifest is repaired below, not refused here
    diffs: list[str] = []
    for key in IDENTITY_FIELDS:
        diffs += identity_differences({key: reader.attributes.get(key, {})}, {key: wanted[key]})
    if diffs:
        raise UserError(
            f"the cache at {url} was written for a different run:\n    " + "\n    ".join(diffs),
            "use a new --cache path for this teacher/dataset/plan, or restore the original config to resume",
        )
    layout = []
    have = reader.attributes
    if int(have["num_samples"]) != num_samples:
        layout.append(
            f"samples (training images with annotations x CACHE.NUM_VARIANTS): cache has "
            f"{have['num_samples']}, this run has {num_samples}"
        )
    for key, attr in (("CACHE.SHARD_SAMPLES", "shard_samples"), ("CACHE.TILE", "tile")):
        if int(have[attr]) != int(cfg.CACHE[key.split(".")[1]]):
            layout.append(f"{key}: cache has {have[attr]}, this run has {cfg.CACHE[key.split('.')[1]]}")
    if [lv.to_dict() for lv in reader.levels] != [lv.to_dict() for lv in levels]:
        layout.append(
            f"levels (CACHE.LEVELS, sizes): cache has {[lv.to_dict() for lv in reader.levels]}, this run "
            f"has {[lv.to_dict() for lv in levels]}"
        )
    encoding = str(cfg.CACHE.ENCODING)
    if encoding != "auto":
        if encoding != reader.encoding:
            layout.append(f"CACHE.ENCODING: cache has {reader.encoding}, this run has {encoding}")
        elif validate_compressor(str(cfg.CACHE.COMPRESSOR)) != reader.compressor:
            layout.append(f"CACHE.COMPRESSOR: cache has {reader.compressor}, this run has {cfg.CACHE.COMPRESSOR}")
    if layout:
        raise UserError(
            f"--resume cannot change the layout of the cache at {url}:\n    " + "\n    ".join(layout),
            "drop these overrides (a resumed cache keeps its layout: e.g. CACHE.ENCODING auto keeps the "
            "cache's encoding), or write the new layout to a new --cache path",
        )
    return reader.encoding


@dataclass
class ResumeCheck:
    """What the resume's check found and did, for the user and for the summary."""

    notes: list[str] = field(default_factory=list)  # one line per finding / repair
    deep: bool = False  # every committed chunk was read (--repair, or damage found)
    finished: bool = False  # the cache was finished and nothing was found damaged: its manifest stands
    unread_shards: int = 0  # committed shards kept without reading their chunks (a cheap check)
    sizes_from: str = ""  # how their objects were proven whole: "the manifest's sizes" / "their shard indexes"


def prepare_resume(url: str, teacher_weights: Mapping[str, np.ndarray], deep: bool) -> ResumeCheck:
    """Find the cache's damage and make it resumable; returns what was checked and repaired.

    Runs on rank 0 before any writer opens the cache. Raises UserError for damage a resume cannot
    repair (metadata), naming each file. Without `deep` the chunks of committed shards are not read:
    each object's size is confirmed (against the manifest, or by its crc32c-checked shard index), which
    catches loss and truncation; a byte flipped inside a chunk only a deep check finds.
    """
    report = check_cache(url, deep=deep)
    if not deep and any(d.kind != "manifest" for d in report.damage) and not report.of_kind(METADATA):
        # Damage found cheaply suggests more that only reading finds: read every chunk, as --repair does.
        notes_deep = True
        report = check_cache(url, deep=True)
    else:
        notes_deep = False
    metadata = report.of_kind(METADATA)
    if metadata:
        raise UserError(
            f"the cache at {url} has damaged metadata, which a resume cannot recompute:\n    "
            + "\n    ".join(f"{d.key}: {d.message}" for d in metadata),
            "restore these files from a copy of the cache, or delete the cache and dump again",
        )
    notes: list[str] = ["damage found: every committed chunk was read, as --repair does"] if notes_deep else []
    store = open_store(url, read_only=False)
    if report.damage:
        delete_manifest(store)  # first: from here on the cache is not vouched for until the dump finishes
    shards = report.damaged_shards()
    if shards:
        named = set()
        for d in report.damage:
            if d.shard is not None and d.key not in named:
                named.add(d.key)
                notes.append(f"damaged: {d.key}: {d.message}")
        uncommit_shards(url, shards)
        notes.append(f"rewriting {len(shards)} damaged shard(s): {', '.join(map(str, shards))}")
    weights_bad = report.of_kind(TEACHER_WEIGHTS)
    if report.weights != COMPLETE or weights_bad:
        why = (
            weights_bad[0].key + ": " + weights_bad[0].message
            if weights_bad
            else {
                "absent": "missing",
                "incomplete": "incomplete (an interrupted write)",
                "unchecked": "stored without checksums (format 1.0)",
            }[report.weights]
        )
        notes.append(f"storing the teacher weights again ({why})")
        writer = CacheWriter.open(url)
        writer.put_teacher_weights(dict(teacher_weights))
        writer.close()
    if report.of_kind("manifest"):
        notes.append("the manifest was damaged: a new one is written when the dump finishes")
    kept = [s for s in report.committed_shards() if s not in set(shards)]
    return ResumeCheck(
        notes,
        deep or notes_deep,
        report.finished and not report.damage and report.weights == COMPLETE,
        0 if deep or notes_deep else len(kept),
        "the manifest's sizes" if report.finished else "their crc32c-checked shard indexes",
    )
