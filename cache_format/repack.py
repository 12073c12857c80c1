"""`icd cache repack`: re-encode a cache (e.g. fp16 -> int8) shard by shard in parallel with dask.

The destination keeps the source's identity attributes, levels, layout, teacher weights and exactly
its committed samples (uncommitted ones stay uncommitted, so a partial dump can still be resumed); a
finished source gives a finished destination (its manifest written last). A repack that fails removes
the destination it created, so no partial copy is left that looks like a cache, and never touches a
destination it was not asked to replace (check_destination).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass

import dask

from cache_format.compressors import validate_compressor
from cache_format.encodings import parse_encoding
from cache_format.errors import CacheError, CorruptChunkError
from cache_format.integrity import check_cache, finish_cache
from cache_format.reader import CacheReader
from cache_format.remote import default_workers
from cache_format.schema import RESERVED_ATTRIBUTES
from cache_format.state import ABSENT, CACHE, CREATING, OTHER, check_apart, describe_contents, store_state
from cache_format.store import local_path, open_store, run_on_zarr_loop
from cache_format.writer import CacheWriter


@dataclass
class RepackResult:
    src: str
    dst: str
    encoding: str
    compressor: str
    samples: int
    bytes_written: int


def _repack_shard(
    reader: CacheReader, writer: CacheWriter, shard: int, committed, failed: threading.Event
) -> tuple[int, BaseException | None]:
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


def check_destination(src: str, dst: str, overwrite: bool) -> str:
    """The destination's state, after refusing one a repack must not write: the source itself, a location
    containing it or inside it, a store holding anything but an ICD cache, or an existing cache without
    `--overwrite`. Nothing has been written when this raises."""
    check_apart(
        dst,
        "repack destination",
        {"source": src},
        "write the repacked cache to a path outside the source (e.g. a sibling directory)",
    )
    state = store_state(dst)
    if state == OTHER:
        raise CacheError(
            f"the repack destination {dst} holds something that is not an ICD teacher cache "
            f"({describe_contents(dst)}); repack never writes into it, with or without --overwrite",
            "choose a destination that does not exist yet (or an empty directory)",
        )
    if state in (CACHE, CREATING) and not overwrite:
        what = "a cache" if state == CACHE else "an interrupted cache creation"
        raise CacheError(
            f"the repack destination {dst} already holds {what}",
            "pass --overwrite to replace it, or choose a destination that does not exist yet",
        )
    return state


def repack(
    src: str,
    dst: str,
    encoding: str,
    compressor: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> RepackResult:
    """Write a copy of `src` at `dst` with another encoding/compressor.

    `overwrite` replaces a destination that holds a cache (only that). Every check runs before anything is
    written; the old destination is removed only once the new copy is complete: a local one is written
    beside it and swapped in by rename, an object-store one after every chunk of the source was read and
    checked (object stores have no rename), so a refused or failed repack leaves the old copy as it was.
    """
    reader = CacheReader(src)
    state = check_destination(src, dst, overwrite)
    enc = parse_encoding(encoding).name
    comp = validate_compressor(compressor or reader.compressor)
    identity = {k: v for k, v in reader.attributes.items() if k not in RESERVED_ATTRIBUTES}
    layout = reader.layout
    # Checked before anything is written: a damaged source is refused with the object at fault.
    committed = reader.committed()
    listed = (reader.manifest or {}).get("teacher_weights")
    weights = reader.teacher_weights() if reader.has_teacher_weights() or listed else None
    replacing = state != ABSENT
    local = local_path(str(dst))
    local = os.path.realpath(local) if local is not None else None  # a symlinked destination: swap its target
    target = str(dst)
    if replacing and local is not None:
        target = _staging_path(local)  # written beside the old copy, swapped in when complete
    elif replacing:
        _check_source_whole(src, workers)  # object store: the old copy is deleted before writing
    existed_as_dir = local is not None and os.path.isdir(local)
    created = False
    try:
        writer = CacheWriter.create(
            target,
            num_samples=reader.num_samples,
            levels=reader.levels,
            encoding=enc,
            compressor=comp,
            attributes=identity,
            shard_samples=layout.shard_samples,
            tile=layout.tile,
            instance_capacity=layout.instance_capacity,
            overwrite=replacing and target == str(dst),
        )
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
        if target != str(dst):
            shutil.rmtree(target, ignore_errors=True)
        elif created:
            _remove(target, keep_dir=existed_as_dir)
        raise
    if target != str(dst):
        _swap_in(target, local)
    return RepackResult(
        reader.url, str(dst), writer.encoding.name, writer.compressor, int(sum(counts)), writer.bytes_written
    )


def _staging_path(local: str) -> str:
    """A fresh sibling of the local destination `local` (same filesystem, so the swap is two renames)."""
    parent, name = os.path.split(local.rstrip(os.sep))
    return tempfile.mkdtemp(prefix=f".{name}.repack-", dir=parent)


def _swap_in(staging: str, local: str) -> None:
    """Replace the old local destination by the complete new copy: rename the old one aside, rename the
    new one into place, then delete the old one (a crash in between leaves both, named, never neither)."""
    old = _staging_path(local)
    os.rmdir(old)
    os.rename(local, old)
    os.rename(staging, local)
    shutil.rmtree(old)


def _check_source_whole(src: str, workers: int | None) -> None:
    """Read every committed chunk of the source before an object-store destination is deleted: a damage
    found mid-copy would otherwise leave neither the old destination nor a new one."""
    report = check_cache(src, deep=True, workers=workers)
    bad = [d for d in report.damage if d.kind != "manifest"]
    if bad:
        raise CorruptChunkError(
            f"the repack source {src} is damaged ({bad[0].key}: {bad[0].message}); the destination was not touched",
            f"`icd cache verify {src}` lists every damaged "
            "object; repair the source with `icd dump ... --resume --repair` first",
            key=bad[0].key,
        )


def _remove(url: str, keep_dir: bool = False) -> None:
    """Delete a destination this repack created, so that a failure leaves nothing behind (an empty
    directory that existed before stays)."""
    if store_state(url) == ABSENT and keep_dir:
        return
    store = open_store(url, read_only=False)
    run_on_zarr_loop(store.clear())
    path = getattr(store, "root", None)  # LocalStore: remove the emptied directory too
    if path is not None and not keep_dir:
        with contextlib.suppress(OSError):
            os.rmdir(path)
