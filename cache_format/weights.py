"""The teacher weights stored in a cache: write them with per-tensor checksums, read them back checked.

Why checksums of the values (not only zarr's per-chunk crc32c): a weight tensor is one chunk, and a
deleted chunk is not an error in zarr - it reads back as the fill value, zeros. A student initialised
from those zeros trains without a word, so every tensor's crc32c is stored next to the name list and a
finished dump's manifest holds the digest of the whole set (SPEC.md, teacher_weights).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import crc32c
import numpy as np
import zarr

from cache_format.errors import CacheError, CorruptChunkError
from cache_format.objects import metadata_key, single_chunk_key
from cache_format.schema import WEIGHTS_GROUP

# weights_state values
ABSENT, INCOMPLETE, UNCHECKED, COMPLETE = "absent", "incomplete", "unchecked", "complete"


def tensor_crc(value: np.ndarray) -> int:
    """crc32c of a tensor's values, C order, little endian."""
    value = np.ascontiguousarray(value)
    return int(crc32c.crc32c(value.astype(value.dtype.newbyteorder("<"), copy=False)))


def weights_digest(state: Mapping[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and values, names sorted: the set as one value."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(state[name])
        digest.update(f"{name}\0{value.dtype.str}\0{list(value.shape)}\0".encode())
        digest.update(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


def weights_state(root: zarr.Group) -> str:
    """ABSENT (no group), INCOMPLETE (its name list, written last, is missing: an interrupted write),
    UNCHECKED (complete but without per-tensor checksums: written before format 1.1) or COMPLETE."""
    try:
        group = root[WEIGHTS_GROUP]
    except KeyError:
        return ABSENT
    if not isinstance(group, zarr.Group) or "names" not in group.attrs:
        return INCOMPLETE
    return COMPLETE if "crc32c" in group.attrs else UNCHECKED


def read_weights(root: zarr.Group, url: str, manifest: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Every stored tensor (name -> array), each checked against its crc32c and the set against the manifest.

    Raises CacheError when the cache holds no (complete) weights and its manifest does not list any, and
    CorruptChunkError naming the object when stored weights fail a check.
    """
    listed = (manifest or {}).get("teacher_weights")
    state = weights_state(root)
    if state in (ABSENT, INCOMPLETE):
        if listed:
            raise CorruptChunkError(
                f"cache {url}: the teacher weights are {'missing' if state == ABSENT else 'incomplete'}, but the "
                f"finished dump stored {len(listed['names'])} tensors",
                "run `icd dump ... --resume` to store them again",
                key=metadata_key(WEIGHTS_GROUP),
            )
        what = "no teacher weights" if state == ABSENT else "incomplete teacher weights (their write was interrupted)"
        raise CacheError(
            f"cache {url} holds {what}",
            "run `icd dump ... --resume` with the dump's config: it stores them (or initialise the "
            "student otherwise: DISTILL.INIT_FROM_TEACHER False)",
        )
    group = root[WEIGHTS_GROUP]
    names = list(group.attrs["names"])
    crcs = dict(group.attrs.get("crc32c", {}))
    out: dict[str, np.ndarray] = {}
    for name in names:
        try:
            arr = group[name]
        except KeyError:
            raise CorruptChunkError(
                f"cache {url}: teacher weight {name!r} is missing",
                "run `icd dump ... --resume` to store the teacher weights again",
                key=metadata_key(f"{WEIGHTS_GROUP}/{name}"),
            ) from None
        key = single_chunk_key(arr)
        try:
            value = np.asarray(arr[...])
        except Exception as exc:
            raise CorruptChunkError(
                f"cache {url}: teacher weight {name!r} cannot be read ({key}: {type(exc).__name__}: {exc})",
                "run `icd dump ... --resume` to store the teacher weights again",
                key=key,
            ) from exc
        if name in crcs and tensor_crc(value) != int(crcs[name]):
            raise CorruptChunkError(
                f"cache {url}: teacher weight {name!r} ({key}) fails its checksum: the chunk is "
                "missing, truncated or altered (a missing chunk reads back as zeros)",
                "run `icd dump ... --resume` to store the teacher weights again",
                key=key,
            )
        out[name] = value
    if listed:
        if sorted(listed["names"]) != sorted(names) or listed["sha256"] != weights_digest(out):
            raise CorruptChunkError(
                f"cache {url}: the teacher weights differ from those the finished dump stored",
                "run `icd dump ... --resume` to store the teacher weights again",
                key=metadata_key(WEIGHTS_GROUP),
            )
    return out
