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
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import zarr

from cache_format.arrays import CacheArrays, open_arrays
from cache_format.checksums import instances_crc, level_crc
from cache_format.encodings import Encoding, parse_encoding
from cache_format.errors import CacheError, CorruptChunkError
from cache_format.manifest import committed_mask, load_manifest, records_crc, root_differences
from cache_format.objects import metadata_key, shard_key
from cache_format.opening import open_root
from cache_format.remote import access_error, is_remote
from cache_format.schema import (
    COL,
    RECORD_FIELDS,
    WEIGHTS_GROUP,
    CachedSample,
    Layout,
    LevelSpec,
    SampleMeta,
    layout_from_attributes,
    levels_from_attributes,
    quant_columns,
)
from cache_format.store import run_on_zarr_loop
from cache_format.weights import COMPLETE, UNCHECKED, read_weights, weights_state

_BLOCK_CACHE_SHARDS = 64
REMOTE_PREFETCH = 8  # samples in flight per read_samples call on an object store
# A sample that fails its checks is fetched once more before it is reported: a resumed writer may
# atomically replace a shard object between this reader's read of the shard index and of a chunk (old
# index, new bytes); a second read sees one version (SPEC.md, Committed semantics).
_ATTEMPTS = (0, 1)


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
        self._arrays: CacheArrays = open_arrays(
            self._root, self.levels, self._encoding, self.url, self.layout, self.compressor
        )
        self.manifest: dict[str, Any] | None = None
        if self.check_manifest:
            self.manifest = load_manifest(self._root, self.url)
            self._check_metadata()
        self._quant_cols = quant_columns(self.levels)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._lock = threading.Lock()
        # Samples read_samples keeps in flight: hides request latency on object stores; 1 on local disk.
        self.prefetch: int = REMOTE_PREFETCH if is_remote(self.url) else 1

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
            raise CorruptChunkError(
                f"cache {self.url}: zarr.json differs from the manifest: {diffs[0]}",
                "restore the cache's zarr.json from a copy (or re-create the cache)",
                key="zarr.json",
            )
        arrays = {
            a.path: a
            for a in [*self._arrays.features.values(), self._arrays.records, self._arrays.boxes, self._arrays.classes]
            + ([self._arrays.quant] if self._arrays.quant else [])
        }
        for path, arr in arrays.items():
            want = self.manifest["arrays"].get(path)
            if want is None or list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
                raise CorruptChunkError(
                    f"cache {self.url}: {metadata_key(path)} says shape {list(arr.shape)} {arr.dtype}, the manifest "
                    f"{want and want['shape']} {want and want['dtype']}",
                    "restore that file from a copy of the cache (or re-create the cache)",
                    key=metadata_key(path),
                )

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
                    key=key,
                )

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
        except Exception as exc:
            self._raise_if_access_error(exc)
        # A damaged records chunk hides only its own shard's samples; verify reports it.
        for s in range(self.layout.num_shards):
            rng = self.layout.shard_range(s)
            try:
                out[rng.start : rng.stop] = np.asarray(records[rng.start : rng.stop, COL["committed"]]) == 1.0
            except Exception as exc:
                self._raise_if_access_error(exc)
                out[rng.start : rng.stop] = False
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
            self._raise_if_access_error(exc)
            raise CorruptChunkError(
                f"cache {self.url}: the records of samples {start}-{stop - 1} cannot be read "
                f"({type(exc).__name__}: {exc})",
                "run `icd cache verify`; restore or re-create the cache",
            ) from exc

    def _raise_if_access_error(self, exc: BaseException) -> None:
        """An unreachable or refusing store is not damage: raise StoreAccessError instead of reporting it."""
        denied = access_error(exc, self.url)
        if denied is not None:
            raise denied from exc

    def _load_blocks(self, indices: Iterable[int]) -> None:
        """Make sure the records (and int8 scales) block of each index's shard is cached and up to date.

        Shards are fetched concurrently; within a shard the records come first: once a record says
        committed, everything it points to (the scales included) was written before it.
        """
        stale: dict[int, int] = {}
        with self._lock:
            for index in indices:
                shard = self.layout.shard_of(index)
                cached = self._blocks.get(shard)
                if cached is not None:
                    self._blocks.move_to_end(shard)
                lo = self.layout.shard_range(shard).start
                if cached is None or cached[0][index - lo, COL["committed"]] != 1.0:
                    stale.setdefault(shard, index)
        if not stale:
            return

        async def one(shard: int) -> Any:
            rng = self.layout.shard_range(shard)
            try:
                rows = np.asarray(await self._arrays.records.async_array.getitem(slice(rng.start, rng.stop)))
            except Exception as exc:
                return ("records", exc)
            quant = None
            if self._arrays.quant is not None and (rows[:, COL["committed"]] == 1.0).any():
                try:
                    quant = np.asarray(await self._arrays.quant.async_array.getitem(slice(rng.start, rng.stop)))
                except Exception as exc:
                    return ("scales", exc)
            return rows, quant

        shards = list(stale)
        for shard, res in zip(shards, _gather([one(shard) for shard in shards])):
            if isinstance(res[1], BaseException):
                what, exc = res
                self._raise_if_access_error(exc)
                name = "records chunk" if what == "records" else "int8 scales"
                raise CorruptChunkError(
                    f"cache {self.url}: sample {stale[shard]}: the {name} of shard {shard} cannot be read "
                    f"({type(exc).__name__}: {exc})",
                    "run `icd cache verify`; restore or re-create the cache",
                ) from exc
            with self._lock:
                self._blocks[shard] = res
                while len(self._blocks) > _BLOCK_CACHE_SHARDS:
                    self._blocks.popitem(last=False)

    def _record(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(record row, int8 scales row) of a committed sample, from the block cache (load it first)."""
        shard = self.layout.shard_of(index)
        lo = self.layout.shard_range(shard).start
        with self._lock:
            cached = self._blocks.get(shard)
        if cached is None:  # evicted by a concurrent reader thread since _load_blocks: fetch again
            self._load_blocks([index])
            with self._lock:
                cached = self._blocks[shard]
        row = cached[0][index - lo]
        if row[COL["committed"]] != 1.0:
            raise CacheError(
                f"sample {index} of {self.url} is not committed (not written yet, or its writer "
                "has not finished its shard)",
                "read only samples where reader.committed() is True, or finish the dump",
            )
        if not (row[COL["resized_h"]] >= 1 and row[COL["resized_w"]] >= 1):
            raise CorruptChunkError(
                f"cache {self.url}: sample {index}: its record holds an invalid resized size",
                "run `icd cache verify`; restore or re-create the cache",
            )
        return row, (None if cached[1] is None else cached[1][index - lo])

    def _check_index(self, index: Any) -> int:
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < self.num_samples:
            raise CacheError(
                f"sample index {index!r} out of range 0..{self.num_samples - 1}", "index samples 0..num_samples-1"
            )
        return int(index)

    def _check_levels(self, levels: Iterable[str] | None) -> list[str]:
        names = self.level_names if levels is None else list(levels)
        unknown = [n for n in names if n not in self._level_index]
        if unknown:
            raise CacheError(
                f"levels {unknown} are not in cache {self.url} (it has {self.level_names})",
                "ask for levels the cache holds",
            )
        return names

    def meta(self, index: int) -> SampleMeta:
        index = self._check_index(index)
        self._load_blocks([index])
        row, _ = self._record(index)
        return _meta_of(row)

    # ----------------------------------------------------------------- samples
    def read_sample(self, index: int, levels: Iterable[str] | None = None, decode: bool = True) -> CachedSample:
        """One committed sample: float32 features [C, h, w] per level (all, or the named ones), meta, instances.

        decode=False returns the checked stored arrays instead (plus int8 scales in `.quant`), for callers
        that decode on a GPU: it skips the CPU cast, which dominates fp16 reads.
        """
        return self.read_samples([index], levels, decode)[0]

    def read_samples(
        self, indices: Sequence[int], levels: Iterable[str] | None = None, decode: bool = True, ahead: int | None = None
    ) -> list[CachedSample]:
        """Several committed samples (as read_sample each, in order), with up to `ahead` of them in flight.

        The records blocks of all of them are fetched first (one concurrent round), then each sample's
        levels and instances are requested concurrently and up to `ahead` samples are fetched and checked
        at once (default `self.prefetch`: 8 on object stores, where this hides per-request latency -
        docs/OBJECT_STORAGE.md; 1 on local disk, where one sample after the other keeps its bytes in
        the CPU cache while they are checked and decoded, measured faster there). The first failing
        sample raises, as read_sample would.
        """
        indices = [self._check_index(i) for i in indices]
        names = self._check_levels(levels)
        ahead = max(1, int(self.prefetch if ahead is None else ahead))
        self._load_blocks(indices)
        records = [self._record(i) for i in indices]

        def assemble(k: int, fetched: tuple[dict[str, Any], Any]) -> CachedSample:
            index, (row, quant) = indices[k], records[k]
            features, quants = self._checked_levels(index, row, quant, names, fetched[0], decode)
            boxes, classes = self._checked_instances(index, row, fetched[1])
            return CachedSample(
                index, features, _meta_of(row), boxes, classes, None if decode or quant is None else quants
            )

        async def pipeline() -> list[Any]:
            window = asyncio.Semaphore(ahead)  # FIFO: samples start in order

            async def one(k: int) -> CachedSample:
                async with window:
                    for attempt in _ATTEMPTS:
                        fetched = await self._fetch_one(indices[k], records[k][0], names, instances=True)
                        try:
                            # Checks and decoding are CPU work: off the event loop, so other fetches proceed.
                            return await asyncio.to_thread(assemble, k, fetched)
                        except CorruptChunkError:
                            if attempt == _ATTEMPTS[-1]:
                                raise
                    raise AssertionError("unreachable")

            return list(await asyncio.gather(*(one(k) for k in range(len(indices))), return_exceptions=True))

        if ahead == 1:  # one after the other, checked in this thread: exactly read_sample's old path
            return [
                self._retrying(
                    lambda k=k: assemble(k, self._fetch([indices[k]], [records[k][0]], names, instances=True)[0])
                )
                for k in range(len(indices))
            ]
        results = _gather([pipeline()])[0] if indices else []
        for res in results:
            if isinstance(res, BaseException):
                raise res
        return results

    def read_level(self, index: int, level: str) -> np.ndarray:
        """One level of one committed sample, float32 [C, h, w] (no instances read)."""
        index = self._check_index(index)
        names = self._check_levels([level])
        self._load_blocks([index])
        row, quant = self._record(index)
        return self._retrying(
            lambda: self._checked_levels(
                index, row, quant, names, self._fetch([index], [row], names, instances=False)[0][0], True
            )[0][level]
        )

    @staticmethod
    def _retrying(read: Any) -> Any:
        """read() (fetch + checks), once more if the checks fail (see _ATTEMPTS)."""
        for attempt in _ATTEMPTS:
            try:
                return read()
            except CorruptChunkError:
                if attempt == _ATTEMPTS[-1]:
                    raise
        raise AssertionError("unreachable")

    def read_instances(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """GT boxes [n, 4] float32 and classes [n] int64 of one committed sample."""
        index = self._check_index(index)
        self._load_blocks([index])
        row, _ = self._record(index)
        _, inst = self._fetch([index], [row], [], instances=True)[0]
        return self._checked_instances(index, row, inst)

    def _checked_levels(
        self,
        index: int,
        row: np.ndarray,
        quant: np.ndarray | None,
        names: list[str],
        stored: dict[str, Any],
        decode: bool,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
        qs: dict[str, np.ndarray | None] = {}
        for name in names:
            a, b = self._quant_cols[name]
            qs[name] = None if quant is None else quant[a:b].reshape(2, -1)
        arrays = self._level_arrays(index, names, stored)
        for name in names:
            if level_crc(arrays[name], qs[name]) != int(row[len(RECORD_FIELDS) + self._level_index[name]]):
                raise CorruptChunkError(
                    f"cache {self.url}: sample {index} level {name}: stored values fail their checksum "
                    "(a missing, truncated or altered shard)",
                    "run `icd cache verify`; restore or re-create the cache",
                )
        if not decode:
            return arrays, qs
        return {name: self._encoding.decode(arrays[name], qs[name]) for name in names}, qs

    def _level_arrays(self, index: int, names: list[str], stored: dict[str, Any]) -> dict[str, np.ndarray]:
        """The fetched regions of one sample's levels, or the error naming the first that failed."""
        out = {}
        for name in names:
            res = stored[name]
            if isinstance(res, BaseException):
                self._raise_if_access_error(res)
                raise CorruptChunkError(
                    f"cache {self.url}: sample {index} level {name}: chunk cannot be read "
                    f"({type(res).__name__}: {res})",
                    "run `icd cache verify`; restore or re-create the cache",
                ) from res
            out[name] = np.ascontiguousarray(res)
        return out

    def _fetch(
        self, indices: list[int], rows: list[np.ndarray], names: list[str], instances: bool
    ) -> list[tuple[dict[str, Any], Any]]:
        """_fetch_one for several samples, all requested concurrently."""
        return _gather([self._fetch_one(i, row, names, instances) for i, row in zip(indices, rows)])

    async def _fetch_one(
        self, index: int, row: np.ndarray, names: list[str], instances: bool
    ) -> tuple[dict[str, Any], Any]:
        """Stored (encoded) valid regions of `names` and, with `instances`, the boxes/classes rows of one
        sample, requested concurrently: ({level: array or exception}, (boxes, classes) or exception or
        None). Errors are returned, not raised, so that each is reported against its sample and level."""
        meta = _meta_of(row)
        coros = [self._level_region(index, meta, name) for name in names]
        if instances:
            coros.append(self._instance_rows(index, row))
        results = await asyncio.gather(*coros)
        return dict(zip(names, results[: len(names)])), (results[len(names)] if instances else None)

    async def _level_region(self, index: int, meta: SampleMeta, name: str) -> Any:
        lv = self.levels[self._level_index[name]]
        h, w = lv.valid_size(meta.resized_h, meta.resized_w)
        if h > lv.max_h or w > lv.max_w:
            return CacheError(f"record says {h}x{w} > max {lv.max_h}x{lv.max_w}")
        try:
            return await self._arrays.features[name].async_array.getitem((index, slice(None), slice(0, h), slice(0, w)))
        except Exception as exc:  # decoded by the caller into an error naming sample and level
            return exc

    async def _instance_rows(self, index: int, row: np.ndarray) -> Any:
        n, start = int(row[COL["instance_count"]]), int(row[COL["instance_start"]])
        if n <= 0 or start < 0 or start + n > self.layout.instance_rows_per_shard:
            return None  # nothing to fetch; _checked_instances validates the record
        base = self.layout.shard_of(index) * self.layout.instance_rows_per_shard + start
        try:
            boxes, classes = await asyncio.gather(
                self._arrays.boxes.async_array.getitem(slice(base, base + n)),
                self._arrays.classes.async_array.getitem(slice(base, base + n)),
            )
            return np.ascontiguousarray(boxes), np.ascontiguousarray(classes)
        except Exception as exc:
            return exc

    def _checked_instances(self, index: int, row: np.ndarray, fetched: Any) -> tuple[np.ndarray, np.ndarray]:
        n = int(row[COL["instance_count"]])
        start = int(row[COL["instance_start"]])
        if n < 0 or start < 0 or start + n > self.layout.instance_rows_per_shard:
            raise CorruptChunkError(
                f"cache {self.url}: sample {index}: its record holds invalid instance rows",
                "run `icd cache verify`; restore or re-create the cache",
            )
        if n == 0:
            boxes, classes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        elif isinstance(fetched, BaseException):
            self._raise_if_access_error(fetched)
            raise CorruptChunkError(
                f"cache {self.url}: sample {index} level instances: chunk cannot be read "
                f"({type(fetched).__name__}: {fetched})",
                "run `icd cache verify`; restore or re-create the cache",
            ) from fetched
        else:
            boxes, classes = fetched
        if instances_crc(boxes, classes) != int(row[COL["instance_crc"]]):
            raise CorruptChunkError(
                f"cache {self.url}: sample {index} level instances: boxes/classes fail their checksum",
                "run `icd cache verify`; restore or re-create the cache",
            )
        return boxes, classes

    # ----------------------------------------------------------------- teacher weights
    def has_teacher_weights(self) -> bool:
        """Whether complete teacher weights are stored (a finished cache's are also checked on reading)."""
        return weights_state(self._root) in (COMPLETE, UNCHECKED)

    def teacher_weight_sizes(self) -> dict[str, int]:
        """Bytes (uncompressed) of each stored teacher tensor, from the array metadata alone: `inspect`
        needs no weight data (on an object store, that would be a download of every tensor)."""
        if not self.has_teacher_weights():
            return {}
        group = self._root[WEIGHTS_GROUP]
        try:
            return {name: int(group[name].nbytes) for name in group.attrs["names"]}
        except Exception as exc:
            self._raise_if_access_error(exc)
            raise CorruptChunkError(
                f"cache {self.url}: the teacher weights' metadata cannot be read ({type(exc).__name__}: {exc})",
                "re-run stage one's dump to store the teacher weights again",
            ) from exc

    def teacher_weights(self) -> dict[str, np.ndarray]:
        """The teacher's FPN + head tensors stored by stage one (name -> array), each checked against its
        checksum and the set against the manifest: a deleted chunk is an error, never zeros."""
        return read_weights(self._root, self.url, self.manifest)


def _gather(coros: list[Any]) -> list[Any]:
    """Run coroutines concurrently on zarr's event loop from synchronous code: the one place this
    module crosses from sync to async (every concurrent read goes through it)."""

    async def run() -> list[Any]:
        return list(await asyncio.gather(*coros))

    return run_on_zarr_loop(run()) if coros else []


def _meta_of(row: np.ndarray) -> SampleMeta:
    return SampleMeta(
        image_id=int(row[COL["image_id"]]),
        variant=int(row[COL["variant"]]),
        scale=float(row[COL["scale"]]),
        flip=bool(row[COL["flip"]] == 1.0),
        resized_h=int(row[COL["resized_h"]]),
        resized_w=int(row[COL["resized_w"]]),
    )
