"""`icd cache repack`: re-encode a cache (e.g. fp16 -> int8) shard by shard in parallel with dask.

The destination keeps the source's identity attributes, levels, layout, teacher weights and exactly
its committed samples (uncommitted ones stay uncommitted, so a partial dump can still be resumed).
"""
from __future__ import annotations

from dataclasses import dataclass

import dask

from cache_format.errors import CacheError
from cache_format.reader import CacheReader
from cache_format.remote import default_workers
from cache_format.schema import RESERVED_ATTRIBUTES
from cache_format.writer import CacheWriter


@dataclass
class RepackResult:
    src: str
    dst: str
    encoding: str
    compressor: str
    samples: int
    bytes_written: int


def _repack_shard(reader: CacheReader, writer: CacheWriter, shard: int, committed) -> int:
    count = 0
    for i in reader.layout.shard_range(shard):
        if committed[i]:
            s = reader.read_sample(i)
            writer.write_sample(i, s.features, s.meta, s.boxes, s.classes)
            count += 1
    writer.write_shard(shard)
    return count


def repack(src: str, dst: str, encoding: str, compressor: str | None = None, workers: int | None = None,
           overwrite: bool = False) -> RepackResult:
    """Write a copy of `src` at `dst` with another encoding/compressor."""
    reader = CacheReader(src)
    if str(src).rstrip("/") == str(dst).rstrip("/"):
        raise CacheError("repack source and destination are the same store", "write the repacked cache elsewhere")
    identity = {k: v for k, v in reader.attributes.items() if k not in RESERVED_ATTRIBUTES}
    layout = reader.layout
    writer = CacheWriter.create(
        dst, num_samples=reader.num_samples, levels=reader.levels, encoding=encoding,
        compressor=compressor or reader.compressor, attributes=identity, shard_samples=layout.shard_samples,
        tile=layout.tile, instance_capacity=layout.instance_capacity, overwrite=overwrite)
    if reader.has_teacher_weights():
        writer.put_teacher_weights(reader.teacher_weights())
    committed = reader.committed()
    tasks = [dask.delayed(_repack_shard)(reader, writer, s, committed) for s in range(layout.num_shards)]
    counts = dask.compute(*tasks, scheduler="threads", num_workers=workers or default_workers(src, dst))
    writer.close()
    return RepackResult(reader.url, writer.url, writer.encoding.name, writer.compressor, int(sum(counts)),
                        writer.bytes_written)
