"""Cache URLs -> zarr stores, plus file counting for `inspect`.

Local paths and file:// use zarr's LocalStore, whose writes are atomic (temporary file + rename), so a
reader never sees a half-written chunk and a killed writer never leaves one. Every other URL
(memory://, s3://, gs://, ...) goes through fsspec via zarr's FsspecStore; object stores replace
whole objects atomically too (an S3 PUT, and a multipart upload at its completion; docs/OBJECT_STORAGE.md).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlparse

import fsspec
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from cache_format.errors import CacheError
from cache_format.remote import check_url, missing_package_error, redact, storage_options, translated_errors

T = TypeVar("T")


def local_path(url: str) -> str | None:
    """The filesystem path for a plain path or file:// URL, else None."""
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return os.path.abspath(parsed.netloc + parsed.path if parsed.netloc else parsed.path)
    return None


def open_store(url: str, *, read_only: bool) -> Store:
    """The zarr store behind a cache URL."""
    url = str(url)
    path = local_path(url)
    if path is not None:
        if read_only and not os.path.isdir(path):
            raise CacheError(
                f"{url} is not a cache: no such directory",
                "pass the directory given to `icd dump --cache` (or create the cache first)",
            )
        return LocalStore(path, read_only=read_only)
    check_url(url)
    try:
        return FsspecStore.from_url(url, storage_options=storage_options(url), read_only=read_only)
    except ImportError as exc:
        raise missing_package_error(url, exc) from exc
    except ValueError as exc:
        raise CacheError(
            f"cannot open cache URL {redact(url)}: {exc}",
            "pass a local path or an fsspec URL such as s3://bucket/prefix",
        ) from exc


def run_on_zarr_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one of zarr's async store/array coroutines from synchronous code and return its result.

    The one use of a zarr-internal API in the project, kept in this wrapper: zarr 3's stores are
    async-only and zarr exposes no public synchronous entry point for them (nor for gathering several
    array reads concurrently). The coroutine must run on zarr's own IO event loop, not a fresh one
    (`asyncio.run`), because an FsspecStore binds its async filesystem (s3fs, gcsfs) to that loop.
    """
    from zarr.core.sync import sync

    return sync(coroutine)


def store_is_empty(store: Store, url: str = "") -> bool:
    with translated_errors(url, "accessing"):
        return bool(run_on_zarr_loop(store.is_empty("")))


def key_sizes(store: Store, keys: list[str]) -> dict[str, int]:
    """Bytes of several stored objects, asked concurrently (one round trip on an object store, not one
    per key); 0 for a key that does not exist."""

    async def one(key: str) -> int:
        try:
            return int(await store.getsize(key))
        except (FileNotFoundError, KeyError):
            return 0

    async def all_keys() -> list[int]:
        return list(await asyncio.gather(*(one(key) for key in keys)))

    return dict(zip(keys, run_on_zarr_loop(all_keys())))


def usage(url: str, prefix: str = "") -> tuple[int, int]:
    """(number of files/objects, total bytes) under a cache URL (or a key prefix inside it)."""
    url = str(url).rstrip("/") + (f"/{prefix.strip('/')}" if prefix else "")
    path = local_path(url)
    if path is not None:
        files = total = 0
        if not os.path.isdir(path):
            return 0, 0
        for dirpath, _, names in os.walk(path):
            for name in names:
                files += 1
                total += os.path.getsize(os.path.join(dirpath, name))
        return files, total
    check_url(url)
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options(url))
    except ImportError as exc:
        raise missing_package_error(url, exc) from exc
    with translated_errors(url, "listing"):
        try:
            found: dict[str, Any] = fs.find(root, detail=True)
        except FileNotFoundError:
            return 0, 0
    return len(found), sum(int(info.get("size") or 0) for info in found.values())
