"""Where each piece of a cache is stored: the object keys of a shard, their sizes, deleting them.

Keys are relative to the cache root (`features/p3/c/1/0/0/0`) and computed from each array's own
metadata (zarr's chunk key encoding), never found by listing a directory, so the same code serves a
local directory and an object store and a missing object is noticed rather than silently not listed.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable

import zarr
from zarr.abc.store import Store

from cache_format.arrays import CacheArrays
from cache_format.store import run_on_zarr_loop


def chunk_key(array: zarr.Array, coords: tuple[int, ...]) -> str:
    """The key of one stored chunk (or shard object) of `array`, relative to the cache root."""
    return f"{array.path}/{array.metadata.encode_chunk_key(tuple(int(c) for c in coords))}"


def metadata_key(path: str) -> str:
    """The zarr.json metadata document of the node at `path` ('' for the root)."""
    return f"{path}/zarr.json" if path else "zarr.json"


def shard_arrays(arrays: CacheArrays) -> dict[str, zarr.Array]:
    """Every array with one object per shard, by path: features per level, records, int8 scales, instances."""
    out = {arr.path: arr for arr in arrays.features.values()}
    out[arrays.records.path] = arrays.records
    if arrays.quant is not None:
        out[arrays.quant.path] = arrays.quant
    out[arrays.boxes.path] = arrays.boxes
    out[arrays.classes.path] = arrays.classes
    return out


def shard_key(array: zarr.Array, shard: int) -> str:
    """The one object of `array` that holds shard `shard` (every array is chunked by shard)."""
    return chunk_key(array, (shard,) + (0,) * (array.ndim - 1))


def single_chunk_key(array: zarr.Array) -> str:
    """The key of an array stored as one chunk (each teacher-weight tensor)."""
    return chunk_key(array, (0,) * array.ndim)


def object_sizes(store: Store, keys: Iterable[str], batch: int = 1000) -> dict[str, int | None]:
    """Bytes of each object, None where it does not exist; asked concurrently (one stat or HEAD each),
    `batch` at a time so that a COCO-scale cache (~10^5 objects) does not queue them all at once."""
    keys = list(keys)

    async def one(key: str) -> int | None:
        try:
            return int(await store.getsize(key))
        except (FileNotFoundError, KeyError):
            return None

    async def some(part: list[str]) -> list[int | None]:
        return await asyncio.gather(*(one(k) for k in part))

    sizes: list[int | None] = []
    for start in range(0, len(keys), batch):
        sizes += run_on_zarr_loop(some(keys[start:start + batch]))
    return dict(zip(keys, sizes))


def delete_objects(store: Store, keys: Iterable[str]) -> None:
    """Delete objects (absent ones are fine), in the given order: callers delete a shard's records first."""
    for key in keys:
        run_on_zarr_loop(store.delete(key))
