"""Where each piece of a cache is stored: the object keys of a shard, their sizes, deleting them.

Keys are relative to the cache root (`features/p3/c/1/0/0/0`) and computed from each array's own
metadata (zarr's chunk key encoding), never found by listing a directory, so the same code serves a
local directory and an object store and a missing object is noticed rather than silently not listed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import crc32c
import numpy as np
import zarr
from zarr.abc.store import Store, SuffixByteRequest
from zarr.buffer import default_buffer_prototype

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
        sizes += run_on_zarr_loop(some(keys[start : start + batch]))
    return dict(zip(keys, sizes))


def delete_objects(store: Store, keys: Iterable[str]) -> None:
    """Delete objects (absent ones are fine), in the given order: callers delete a shard's records first."""
    for key in keys:
        run_on_zarr_loop(store.delete(key))


def shard_index_problems(store: Store, array: zarr.Array, sizes: dict[str, int]) -> dict[str, str]:
    """{key: problem} for the shard objects of a sharded `array` (keys -> their sizes in bytes) whose
    shard index does not prove them whole: the index (at the object's end, crc32c-checked) cannot be
    read, fails its checksum, or points past the object's end.

    Why by hand: this is the cheap check of a resume on a cache without a manifest (no recorded sizes to
    compare): reading only each object's index (16 bytes per inner chunk) catches a truncated or
    replaced-by-shorter object without reading its chunks. zarr reads the index only as part of a chunk
    read, and offers no public call to check one alone. The layout (little-endian uint64 (offset,
    nbytes) pairs, then crc32c) is the sharding_indexed codec's with index_location "end", which is how
    cache_format.arrays creates every feature array.
    """
    per_shard = 1
    for shard_len, chunk_len in zip(array.shards, array.chunks):
        per_shard *= -(-shard_len // chunk_len)
    index_bytes = 16 * per_shard + 4
    prototype = default_buffer_prototype()

    async def one(key: str, size: int) -> str | None:
        if size < index_bytes:
            return f"{size} bytes, shorter than its own shard index ({index_bytes} bytes): truncated"
        buf = await store.get(key, prototype, byte_range=SuffixByteRequest(index_bytes))
        if buf is None:
            return "disappeared while being checked"
        raw = buf.to_bytes()
        if crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            return "its shard index fails its crc32c: the object is truncated or altered"
        table = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
        used = table[~np.all(table == np.iinfo(np.uint64).max, axis=1)]
        if len(used) and int((used[:, 0] + used[:, 1]).max()) > size - index_bytes:
            return "its shard index points past the object's end: the object is truncated"
        return None

    async def all_keys(items: list[tuple[str, int]]) -> list[str | None]:
        return await asyncio.gather(*(one(k, s) for k, s in items))

    items = list(sizes.items())
    found: dict[str, str] = {}
    for start in range(0, len(items), 1000):
        part = items[start : start + 1000]
        for (key, _), problem in zip(part, run_on_zarr_loop(all_keys(part))):
            if problem is not None:
                found[key] = problem
    return found
