"""`icd cache repack`: re-encode a cache (e.g. fp16 -> int8) shard by shard in parallel with dask.

The destination keeps the source's identity attributes, levels, layout, teacher weights and exactly
its committed samples (uncommitted ones stay uncommitted, so a partial dump can still be resumed); a
finished source gives a finished destination (its manifest written last). A repack that fails removes
the destination it created, so no partial copy is left that looks like a cache.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import dask

from cache_format.errors import CacheError
from cache_format.integrity import finish_cache
from cache_format.reader import CacheReader
from cache_format.remote import default_workers
from cache_format.schema import RESERVED_ATTRIBUTES
from cache_format.state import ABSENT, store_state
from cache_format.store import open_store, run_on_zarr_loop
from cache_format.writer import CacheWriter


@dataclass
class RepackResult:
    src: str
    dst: str
    encoding: str
    compressor: str
    samples: int
    bytes_written: int


def _repack_shard(reader: CacheReader, writer: CacheWriter, shard: int, committed,
                  failed: threading.Event) -> tuple[int, BaseException | None]:
    """Copy one shard; (samples copied, the error that stopped it). Errors are returned, not raised, so
    that dask.compute waits for every shard to stop writing before a failed repack removes the
    destination (a raised error returns at once while other threads are still writing into it)."""
    count = 0
    try:
        for i in reader.layout.shard_range(shard):
            if failed.is_set():  # another shard failed: the destination is going away
                return count, None
            if committed[i]:
                s = reader.read_sample(i)
                writer.write_sample(i, s.features, s.meta, s.boxes, s.classes)
                count += 1
        writer.write_shard(shard)
    except BaseException as exc:  # noqa: BLE001 - handed back to repack(), which re-raises it
        failed.set()
        return count, exc
    return count, None


def repack(src: str, dst: str, encoding: str, compressor: str | None = None, workers: int | None = None,
           overwrite: bool = False) -> RepackResult:
    """Write a copy of `src` at `dst` with another encoding/compressor."""
    reader = CacheReader(src)
    if str(src).rstrip("/") == str(dst).rstrip("/"):
        raise CacheError("repack source and destination are the same store", "write the repacked cache elsewhere")
    identity = {k: v for k, v in reader.attributes.items() if k not in RESERVED_ATTRIBUTES}
    layout = reader.layout
    # Checked before anything is written: a damaged source is refused with the object at fault.
    committed = reader.committed()
    listed = (reader.manifest or {}).get("teacher_weights")
    weights = reader.teacher_weights() if reader.has_teacher_weights() or listed else None
    created = store_state(dst) == ABSENT
    try:
        writer = CacheWriter.create(
            dst, num_samples=reader.num_samples, levels=reader.levels, encoding=encoding,
            compressor=compressor or reader.compressor, attributes=identity, shard_samples=layout.shard_samples,
            tile=layout.tile, instance_capacity=layout.instance_capacity, overwrite=overwrite)
        created = True
        if weights is not None:
            writer.put_teacher_weights(weights)
        failed = threading.Event()
        tasks = [dask.delayed(_repack_shard)(reader, writer, s, committed, failed) for s in range(layout.num_shards)]
        results = dask.compute(*tasks, scheduler="threads", num_workers=workers or default_workers(src, dst))
        errors = [error for _, error in results if error is not None]
        if errors:
            raise errors[0]
        counts = [count for count, _ in results]
        writer.close()
        if reader.finished:
            finish_cache(writer.url)
    except BaseException:
        if created:
            _remove(str(dst))
        raise
    return RepackResult(reader.url, writer.url, writer.encoding.name, writer.compressor, int(sum(counts)),
                        writer.bytes_written)


def _remove(url: str) -> None:
    """Delete a destination this repack created, so that a failure leaves nothing behind."""
    if store_state(url) == ABSENT:
        return
    store = open_store(url, read_only=False)
    run_on_zarr_loop(store.clear())
    path = getattr(store, "root", None)  # LocalStore: remove the emptied directory too
    if path is not None:
        with contextlib.suppress(OSError):
            os.rmdir(path)
