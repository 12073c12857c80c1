"""Open an existing cache's root group and validate that it is a cache this code can read."""

from __future__ import annotations

from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.errors import GroupNotFoundError

from cache_format.errors import CacheError
from cache_format.remote import is_remote, translated_errors
from cache_format.schema import CREATING_ATTRIBUTE, FORMAT_NAME, RESERVED_ATTRIBUTES, check_version
from cache_format.store import open_store


def open_root(url: str, *, read_only: bool) -> tuple[Store, zarr.Group, dict[str, Any]]:
    """(store, root group, root attributes) of the cache at `url`, or CacheError saying why not."""
    store = open_store(url, read_only=read_only)
    # Unreachable store or refused access -> StoreAccessError; anything else about the content below.
    with translated_errors(url, "opening"):
        try:
            root = zarr.open_group(store, mode="r" if read_only else "r+")
        except (GroupNotFoundError, FileNotFoundError, KeyError):
            where = " (or its bucket does not exist)" if is_remote(url) else ""
            raise CacheError(
                f"{url} is not a cache: it holds no zarr group{where}",
                "pass the path of a cache written by `icd dump` (or CacheWriter.create)",
            ) from None
        except (ValueError, TypeError) as exc:
            raise CacheError(
                f"{url} is not a cache: its zarr metadata does not parse ({exc})",
                "the store is damaged; restore it or re-create it",
            ) from exc
    attrs = dict(root.attrs.asdict())
    if CREATING_ATTRIBUTE in attrs and attrs.get("format") != FORMAT_NAME:
        raise CacheError(
            f"{url} is not a cache yet: its creation was interrupted",
            "rerun `icd dump` (with or without --resume): it starts the creation over",
        )
    if attrs.get("format") != FORMAT_NAME or "format_version" not in attrs:
        raise CacheError(
            f"{url} is not a cache: its root has no '{FORMAT_NAME}' format attributes "
            "(a zarr store of something else, or a cache whose creation was interrupted)",
            "pass the path of a cache written by `icd dump`; re-create an interrupted one",
        )
    check_version(attrs["format_version"], url)
    missing = [k for k in RESERVED_ATTRIBUTES if k not in attrs]
    if missing:
        raise CacheError(f"cache {url} lacks root attributes {missing}", "the store is damaged; re-create it")
    return store, root, attrs
