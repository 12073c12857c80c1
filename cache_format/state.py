"""What is at a cache location before a writer starts: nothing, a cache, an interrupted creation, or
something else - and whether a local path can hold a cache directory at all.

Why this exists: a kill during creation leaves a store that is neither empty nor a cache, and without
telling it apart `--resume` would call it "not a cache" and a new run "already exists". Creation writes
the root first with a marker (schema.CREATING_ATTRIBUTE) that the format attributes replace last; a store
in that state holds nothing of value and may be started over.
"""

from __future__ import annotations

import os

import zarr
from zarr.errors import GroupNotFoundError

from cache_format.errors import CacheError
from cache_format.remote import translated_errors
from cache_format.schema import BOXES_ARRAY, CREATING_ATTRIBUTE, FEATURES_GROUP, FORMAT_NAME, WEIGHTS_GROUP
from cache_format.store import local_path, open_store, run_on_zarr_loop, store_is_empty

ABSENT = "absent"  # nothing stored there (or an empty directory)
CREATING = "creating"  # a creation that was interrupted: safe to start over
CACHE = "cache"  # a cache (finished or not; its own checks say which)
OTHER = "other"  # something that is not an ICD cache: never touched

# Top-level names a cache's creation writes; an attribute-less root holding only these is an interrupted
# creation by a writer older than the creation marker.
_OWN_NAMES = {FEATURES_GROUP, BOXES_ARRAY.split("/")[0], "samples", WEIGHTS_GROUP, "zarr.json"}


def check_location(url: str) -> None:
    """Refuse, in one line, a local path that cannot be a cache directory: a file, or a path below a file."""
    path = local_path(str(url))
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise CacheError(
            f"{url} is a file, not a cache directory",
            "pass a directory for the cache: a new path, or one `icd dump` wrote",
        )
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        raise CacheError(
            f"{url} cannot be a directory: {parent} is a file",
            "choose a cache path whose parent directories are directories",
        )


def store_state(url: str) -> str:
    """ABSENT, CREATING, CACHE or OTHER for the store at `url` (CacheError for a path that cannot be one)."""
    url = str(url)
    check_location(url)
    path = local_path(url)
    if path is not None and not os.path.isdir(path):
        return ABSENT
    store = open_store(url, read_only=True)
    if store_is_empty(store, url):
        return ABSENT
    try:
        with translated_errors(url, "opening"):  # an unreachable store is an access error, not "other"
            try:
                attrs = dict(zarr.open_group(store, mode="r").attrs.asdict())
            except GroupNotFoundError:  # objects but no zarr root (the store is not empty): not a cache
                return OTHER
    except CacheError:
        raise
    except Exception:
        return OTHER
    if attrs.get("format") == FORMAT_NAME:
        return CACHE
    if CREATING_ATTRIBUTE in attrs or not attrs:
        # Started over means cleared: only when nothing but the creation's own names is there.
        names = set(run_on_zarr_loop(_list_dir(store)))
        if names <= _OWN_NAMES:
            return CREATING
    return OTHER


async def _list_dir(store) -> list[str]:
    return [name async for name in store.list_dir("")]


def _location(url: str) -> tuple[str, tuple[str, ...]]:
    """(filesystem, path components) of a URL, for comparing where two URLs point.

    Local paths are resolved (symlinks, `..`) so that `caches/x` and `./caches/x/src/..` compare equal;
    an object-store URL is its scheme family, bucket and key prefix."""
    url = str(url)
    path = local_path(url)
    if path is not None:
        return "file", tuple(p for p in os.path.realpath(path).split(os.sep) if p)
    family = {"s3a": "s3", "gcs": "gs"}.get(url.split("://", 1)[0].lower(), url.split("://", 1)[0].lower())
    rest = url.split("://", 1)[1].split("?", 1)[0]
    return family, tuple(p for p in rest.split("/") if p)


def overlap(target: str, source: str) -> str | None:
    """How `target` overlaps `source`: 'is', 'contains', 'lies inside', or None when they are apart."""
    (fs_t, t), (fs_s, s) = _location(target), _location(source)
    if fs_t != fs_s:
        return None
    if t == s:
        return "is"
    if s[: len(t)] == t:
        return "contains"
    if t[: len(s)] == s:
        return "lies inside"
    return None


def check_apart(target: str, target_role: str, sources: dict[str, str], fix: str, allow: tuple[str, ...] = ()) -> None:
    """Refuse a `target` that is, contains or lies inside one of the `sources` ({role: url}) a command reads:
    writing (or deleting) it would destroy or alter what the command is reading. `allow` lists relations
    that are harmless for this target (an OUTPUT_DIR that contains the cache: only named files are
    written into it, never a whole directory replaced)."""
    for role, source in sources.items():
        if not source:
            continue
        how = overlap(target, source)
        if how is not None and how not in allow:
            raise CacheError(
                f"the {target_role} {target} {how} the {role} {source}"
                + ("" if how == "lies inside" else ": writing it would destroy what is being read"),
                fix,
            )


def describe_contents(url: str, limit: int = 4) -> str:
    """A few of the names stored at `url` (for a refusal naming what is there), e.g. "annotations/, 000001.png"."""
    path = local_path(str(url))
    if path is not None:
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return "unreadable contents"
        shown = [n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in names[:limit]]
    else:
        store = open_store(str(url), read_only=True)
        names = sorted(run_on_zarr_loop(_list_dir(store)))
        shown = names[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more
