"""CacheReader: read committed samples back as float32, never returning data that fails its checks.

Every stored chunk carries a crc32c (zarr's Crc32cCodec, shard indexes included) and every sample
record carries a crc32c of each level's stored values, so a flipped byte, a truncated shard or a
missing shard file raises CorruptChunkError naming the sample and level instead of yielding garbage.
A finished cache's manifest is checked cheaply as the reader goes: at open the root attributes and array
shapes, in `committed()` and `records()` the committed samples and records, in `teacher_weights()` the
weights' digest, so what `icd cache verify` would fail is refused here too (cache_format.manifest).
Safe to pickle (e.g. into DataLoader workers): only the URL travels, the store reopens lazily.
"""
from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any, Iterable

import numpy as np
import zarr

from cache_format.arrays import CacheArrays, open_arrays
from cache_format.checksums import instances_crc, level_crc
from cache_format.encodings import Encoding, parse_encoding
from cache_format.errors import CacheError, CorruptChunkError
from cache_format.manifest import committed_mask, load_manifest, records_crc, root_differences
from cache_format.objects import metadata_key, shard_key
from cache_format.opening import open_root
from cache_format.store import run_on_zarr_loop
from cache_format.schema import (COL, RECORD_FIELDS, CachedSample, Layout, LevelSpec, SampleMeta,
                                  layout_from_attributes, levels_from_attributes, quant_columns)
from cache_format.weights import COMPLETE, UNCHECKED, read_weights, weights_state

_BLOCK_CACHE_SHARDS = 64


class CacheReader:
    """Read access to a cache; any number of readers may run while writers append."""

    def __init__(self, url: str, *, check_manifest: bool = True) -> None:
        self.url = str(url)
        self.check_manifest = check_manifest  # False only for `icd cache verify`, which reports instead
        self._open()

    def _open(self) -> None:
        self._store, self._root, attrs = open_root(self.url, read_only=True)
        self.attributes: dict[str, Any] = attrs
        self.levels: list[LevelSpec] = levels_from_attributes(attrs)
        self.layout: Layout = layout_from_attributes(attrs)
        self.num_samples: int = self.layout.num_samples
        self.encoding: str = attrs["encoding"]
        self.compressor: str = attrs["compressor"]
        self._encoding: Encoding = parse_encoding(self.encoding)
        self._level_index = {lv.name: i for i, lv in enumerate(self.levels)}
        self._arrays: CacheArrays = open_arrays(self._root, self.levels, self._encoding, self.url, self.layout)
        self.manifest: dict[str, Any] | None = None
        if self.check_manifest:
            self.manifest = load_manifest(self._root, self.url)
            self._check_metadata()
        self._quant_cols = quant_columns(self.levels)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "check_manifest": self.check_manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url = state["url"]
        self.check_manifest = state.get("check_manifest", True)
        self._open()

    # ----------------------------------------------------------------- manifest
    @property
    def finished(self) -> bool:
        """Whether a finished dump's manifest vouches for this cache (SPEC.md, Manifest)."""
        return self.manifest is not None

    def _check_metadata(self) -> None:
        """Root attributes and array shapes must be those the finished dump recorded."""
        if self.manifest is None:
            return
        diffs = root_differences(self.attributes, self.manifest)
        if diffs:
            raise CorruptChunkError(f"cache {self.url}: zarr.json differs from the manifest: {diffs[0]}",
                                    "restore the cache's zarr.json from a copy (or re-create the cache)", key="zarr.json")
        arrays = {a.path: a for a in [*self._arrays.features.values(), self._arrays.records, self._arrays.boxes,
                                      self._arrays.classes] + ([self._arrays.quant] if self._arrays.quant else [])}
        for path, arr in arrays.items():
            want = self.manifest["arrays"].get(path)
            if want is None or list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
                raise CorruptChunkError(
                    f"cache {self.url}: {metadata_key(path)} says shape {list(arr.shape)} {arr.dtype}, the manifest "
                    f"{want and want['shape']} {want and want['dtype']}",
                    "restore that file from a copy of the cache (or re-create the cache)", key=metadata_key(path))

    def _manifest_still_current(self) -> bool:
        """A resumed dump deletes the manifest before it writes: a mismatch then is progress, not damage."""
        try:
            current = load_manifest(self._root, self.url)
        except CacheError:
            return True
        if current is None:
            self.manifest = None
        return current is not None

    def _refuse_lost_records(self, committed: np.ndarray, records: np.ndarray | None = None) -> None:
        """Raise naming the records chunk of the first shard that differs from the manifest."""
        if self.manifest is None:
            return
        expected = committed_mask(self.manifest)
        for s in range(self.layout.num_shards):
            rng = self.layout.shard_range(s)
            differs = not np.array_equal(expected[rng], committed[rng])
            if not differs and records is not None:
                differs = records_crc(records[rng]) != int(self.manifest["records_crc32c"][s])
            if differs and self._manifest_still_current():
                key = shard_key(self._arrays.records, s)
                raise CorruptChunkError(
                    f"cache {self.url}: the records of samples {rng.start}-{rng.stop - 1} ({key}) differ from those "
                    "the finished dump wrote (a deleted, replaced or edited records chunk)",
                    f"run `icd dump ... --resume` to rewrite that shard (`icd cache verify {self.url}` lists all damage)",
                    key=key)

    def __len__(self) -> int:
        return self.num_samples

    def feature_array(self, level: str) -> zarr.Array:
        """The zarr array of one level (stored dtype, [num_samples, C, max_h, max_w]) for inspection."""
        return self._arrays.features[level]

    @property
    def level_names(self) -> list[str]:
        return [lv.name for lv in self.levels]

    # ----------------------------------------------------------------- records
    def committed(self) -> np.ndarray:
        """bool [num_samples]: which samples are complete and readable (read fresh from the store).

        On a finished cache, raises CorruptChunkError when they are not those the manifest lists.
        """
        out = self._committed()
        self._refuse_lost_records(out)
        return out

    def _committed(self) -> np.ndarray:
        records = self._arrays.records
        out = np.zeros(self.num_samples, dtype=bool)
        try:
            out[:] = np.asarray(records[:, COL["committed"]]) == 1.0
            return out
        except Exception:
            pass
        # A damaged records chunk hides only its own shard's samples; verify reports it.
        for s in range(self.layout.num_shards):
            rng = self.layout.shard_range(s)
            try:
                out[rng.start:rng.stop] = np.asarray(records[rng.start:rng.stop, COL["committed"]]) == 1.0
            except Exception:
                out[rng.start:rng.stop] = False
        return out

    def records(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Raw sample records [stop - start, fields] (float64, columns in attributes['record_fields']
        then one crc per level); uncommitted rows are NaN or stale. Raises CorruptChunkError."""
        stop = self.num_samples if stop is None else stop
        try:
            rows = np.asarray(self._arrays.records[start:stop])
            if start == 0 and stop == self.num_samples:  # a bulk scan: check it against the manifest
                self._refuse_lost_records(rows[:, COL["committed"]] == 1.0, rows)
            return rows
        except CorruptChunkError:
            raise
        except Exception as exc:
            raise CorruptChunkError(f"cache {self.url}: the records of samples {start}-{stop - 1} cannot be read "
                                    f"({type(exc).__name__}: {exc})",
                                    "run `icd cache verify`; restore or re-create the cache") from exc

    def _block(self, index: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """(records rows, quant rows, first index) of the shard holding `index`, cached while valid."""
        shard = self.layout.shard_of(index)
        rng = self.layout.shard_range(shard)
        with self._lock:
            cached = self._blocks.get(shard)
            if cached is not None:
                self._blocks.move_to_end(shard)
        if cached is None or cached[0][index - rng.start, COL["committed"]] != 1.0:
            # Records first: once a record says committed, everything it points to was written before it.
            try:
                rows = np.asarray(self._arrays.records[rng.start:rng.stop])
            except Exception as exc:
                raise CorruptChunkError(
                    f"cache {self.url}: sample {index}: the records chunk of shard {shard} cannot be read "
                    f"({type(exc).__name__}: {exc})", "run `icd cache verify`; restore or re-create the cache") from exc
            quant = None
            if self._arrays.quant is not None and (rows[:, COL["committed"]] == 1.0).any():
                try:
                    quant = np.asarray(self._arrays.quant[rng.start:rng.stop])
                except Exception as exc:
                    raise CorruptChunkError(
                        f"cache {self.url}: sample {index}: the int8 scales of shard {shard} cannot be read "
                        f"({type(exc).__name__}: {exc})",
                        "run `icd cache verify`; restore or re-create the cache") from exc
            cached = (rows, quant)
            with self._lock:
                self._blocks[shard] = cached
                while len(self._blocks) > _BLOCK_CACHE_SHARDS:
                    self._blocks.popitem(last=False)
        return cached[0], cached[1], rng.start

    def _record(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < self.num_samples:
            raise CacheError(f"sample index {index!r} out of range 0..{self.num_samples - 1}",
                             "index samples 0..num_samples-1")
        index = int(index)
        rows, quant, lo = self._block(index)
        row = rows[index - lo]
        if row[COL["committed"]] != 1.0:
            raise CacheError(f"sample {index} of {self.url} is not committed (not written yet, or its writer "
                             "has not finished its shard)",
                             "read only samples where reader.committed() is True, or finish the dump")
        if not (row[COL["resized_h"]] >= 1 and row[COL["resized_w"]] >= 1):
            raise CorruptChunkError(f"cache {self.url}: sample {index}: its record holds an invalid resized size",
                                    "run `icd cache verify`; restore or re-create the cache")
        return row, (None if quant is None else quant[index - lo])

    def meta(self, index: int) -> SampleMeta:
        row, _ = self._record(index)
        return _meta_of(row)

    # ----------------------------------------------------------------- samples
    def read_sample(self, index: int, levels: Iterable[str] | None = None, decode: bool = True) -> CachedSample:
        """One committed sample: float32 features [C, h, w] per level (all, or the named ones), meta, instances.

        decode=False returns the checked stored arrays instead (plus int8 scales in `.quant`), for callers
        that decode on a GPU: it skips the CPU cast, which dominates fp16 reads.
        """
        row, quant = self._record(index)
        index = int(index)
        names = self.level_names if levels is None else list(levels)
        features, quants = self._decode_levels(index, row, quant, names, decode)
        boxes, classes = self._read_instances(index, row)
        return CachedSample(index, features, _meta_of(row), boxes, classes,
                            None if decode or quant is None else quants)

    def read_level(self, index: int, level: str) -> np.ndarray:
        """One level of one committed sample, float32 [C, h, w] (no instances read)."""
        row, quant = self._record(index)
        return self._decode_levels(int(index), row, quant, [level], True)[0][level]

    def read_instances(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """GT boxes [n, 4] float32 and classes [n] int64 of one committed sample."""
        row, _ = self._record(index)
        return self._read_instances(int(index), row)

    def _decode_levels(self, index: int, row: np.ndarray, quant: np.ndarray | None, names: list[str],
                       decode: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
        unknown = [n for n in names if n not in self._level_index]
        if unknown:
            raise CacheError(f"levels {unknown} are not in cache {self.url} (it has {self.level_names})",
                             "ask for levels the cache holds")
        qs: dict[str, np.ndarray | None] = {}
        for name in names:
            a, b = self._quant_cols[name]
            qs[name] = None if quant is None else quant[a:b].reshape(2, -1)
        # One retry: a resumed writer may atomically replace a shard object between this reader's read
        # of the shard index and of a chunk (old index, new bytes); a second read sees one version.
        for attempt in (0, 1):
            try:
                stored = self._read_levels(index, names, _meta_of(row))
                for name in names:
                    if level_crc(stored[name], qs[name]) != int(row[len(RECORD_FIELDS) + self._level_index[name]]):
                        raise CorruptChunkError(
                            f"cache {self.url}: sample {index} level {name}: stored values fail their checksum "
                            "(a missing, truncated or altered shard)",
                            "run `icd cache verify`; restore or re-create the cache")
                break
            except CorruptChunkError:
                if attempt == 1:
                    raise
        if not decode:
            return stored, qs
        return {name: self._encoding.decode(stored[name], qs[name]) for name in names}, qs

    def _read_levels(self, index: int, names: list[str], meta: SampleMeta) -> dict[str, np.ndarray]:
        """Stored (encoded) valid regions of several levels, fetched concurrently."""

        async def one(name: str) -> Any:
            lv = self.levels[self._level_index[name]]
            h, w = lv.valid_size(meta.resized_h, meta.resized_w)
            if h > lv.max_h or w > lv.max_w:
                return CacheError(f"record says {h}x{w} > max {lv.max_h}x{lv.max_w}")
            try:
                return await self._arrays.features[name].async_array.getitem(
                    (index, slice(None), slice(0, h), slice(0, w)))
            except Exception as exc:  # decoded below into an error naming sample and level
                return exc

        async def all_levels() -> list[Any]:
            return await asyncio.gather(*(one(n) for n in names))

        results = run_on_zarr_loop(all_levels())
        out = {}
        for name, res in zip(names, results):
            if isinstance(res, BaseException):
                raise CorruptChunkError(
                    f"cache {self.url}: sample {index} level {name}: chunk cannot be read "
                    f"({type(res).__name__}: {res})", "run `icd cache verify`; restore or re-create the cache") from res
            out[name] = np.ascontiguousarray(res)
        return out

    def _read_instances(self, index: int, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = int(row[COL["instance_count"]])
        start = int(row[COL["instance_start"]])
        if n < 0 or start < 0 or start + n > self.layout.instance_rows_per_shard:
            raise CorruptChunkError(f"cache {self.url}: sample {index}: its record holds invalid instance rows",
                                    "run `icd cache verify`; restore or re-create the cache")
        base = self.layout.shard_of(index) * self.layout.instance_rows_per_shard + start
        if n == 0:
            boxes, classes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        else:
            try:
                boxes = np.ascontiguousarray(self._arrays.boxes[base:base + n])
                classes = np.ascontiguousarray(self._arrays.classes[base:base + n])
            except Exception as exc:
                raise CorruptChunkError(f"cache {self.url}: sample {index} level instances: chunk cannot be read "
                                        f"({type(exc).__name__}: {exc})",
                                        "run `icd cache verify`; restore or re-create the cache") from exc
        if instances_crc(boxes, classes) != int(row[COL["instance_crc"]]):
            raise CorruptChunkError(f"cache {self.url}: sample {index} level instances: boxes/classes fail "
                                    "their checksum", "run `icd cache verify`; restore or re-create the cache")
        return boxes, classes

    # ----------------------------------------------------------------- teacher weights
    def has_teacher_weights(self) -> bool:
        """Whether complete teacher weights are stored (a finished cache's are also checked on reading)."""
        return weights_state(self._root) in (COMPLETE, UNCHECKED)

    def teacher_weights(self) -> dict[str, np.ndarray]:
        """The teacher's FPN + head tensors stored by stage one (name -> array), each checked against its
        checksum and the set against the manifest: a deleted chunk is an error, never zeros."""
        return read_weights(self._root, self.url, self.manifest)


def _meta_of(row: np.ndarray) -> SampleMeta:
    return SampleMeta(image_id=int(row[COL["image_id"]]), variant=int(row[COL["variant"]]),
                      scale=float(row[COL["scale"]]), flip=bool(row[COL["flip"]] == 1.0),
                      resized_h=int(row[COL["resized_h"]]), resized_w=int(row[COL["resized_w"]]))
