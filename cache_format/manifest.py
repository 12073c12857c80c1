"""The manifest: what a finished dump wrote, recorded last, so that a cache can prove it is whole.

Per-chunk and per-sample checksums catch altered bytes, but not what is absent: a deleted records chunk
makes its samples look "not written yet", a deleted weight chunk reads back as zeros, an edited count
hides samples. The manifest records, once every sample is written, the root attributes, each array's
shape and the size of each of its objects, which samples are committed, a crc32c of each shard's
records and the digest of the teacher weights; everything else is chained to it by the records' own
checksums. It is the attributes of the group `manifest` (one object, `manifest/zarr.json`, written with
one atomic put after everything else; an object store needs no listing or rename), carrying the sha256
of its own content. SPEC.md, Manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import crc32c
import numpy as np
import zarr
from zarr.abc.store import Store

from cache_format.errors import CacheError, CorruptChunkError
from cache_format.objects import delete_objects, metadata_key
from cache_format.schema import COL, MANIFEST_GROUP

MANIFEST_VERSION = 1
MANIFEST_KEY = metadata_key(MANIFEST_GROUP)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_digest(body: Mapping[str, Any]) -> str:
    """sha256 of the manifest's content (every key but 'digest')."""
    return hashlib.sha256(canonical_json({k: v for k, v in body.items() if k != "digest"})).hexdigest()


def records_crc(rows: np.ndarray) -> int:
    """crc32c of one shard's records, uncommitted rows zeroed (their fill values carry nothing)."""
    committed = rows[:, COL["committed"]] == 1.0
    data = np.where(committed[:, None], rows, 0.0).astype("<f8")
    return int(crc32c.crc32c(np.ascontiguousarray(data)))


def load_manifest(root: zarr.Group, url: str) -> dict[str, Any] | None:
    """The cache's manifest, None if it has none (an unfinished dump, or written before format 1.1).

    Raises CorruptChunkError when the manifest exists but fails its own digest.
    """
    try:
        node = root[MANIFEST_GROUP]
    except KeyError:
        return None
    body = dict(node.attrs.asdict()) if isinstance(node, zarr.Group) else {}
    if not body or body.get("digest") != content_digest(body):
        raise CorruptChunkError(
            f"cache {url}: {MANIFEST_KEY} is damaged (it fails its own digest)",
            "run `icd dump ... --resume --repair`: it re-checks every shard and writes a new manifest",
            key=MANIFEST_KEY,
        )
    if int(body.get("manifest_version", 0)) > MANIFEST_VERSION:
        raise CacheError(
            f"cache {url} has a manifest of version {body['manifest_version']}, newer than the "
            f"{MANIFEST_VERSION} this code reads",
            "upgrade this package to read it",
        )
    return body


def write_manifest(store: Store, body: Mapping[str, Any]) -> dict[str, Any]:
    """Write the manifest (its digest added) as one object; the last write of a finished cache."""
    body = {**body, "manifest_version": MANIFEST_VERSION}
    body["digest"] = content_digest(body)
    zarr.open_group(store, path=MANIFEST_GROUP, mode="w", attributes=body)
    return body


def delete_manifest(store: Store) -> None:
    """Withdraw the claim that the cache is finished: done before any write to a finished cache."""
    delete_objects(store, [MANIFEST_KEY])


def committed_mask(manifest: Mapping[str, Any]) -> np.ndarray:
    """bool [num_samples]: the samples the finished dump committed."""
    mask = np.ones(int(manifest["num_samples"]), dtype=bool)
    mask[np.asarray(manifest["uncommitted"], dtype=np.int64)] = False
    return mask


def root_differences(attrs: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
    """Root attributes that differ from those the finished dump recorded, one line each."""
    recorded = manifest["root_attributes"]
    out = []
    for key in sorted(set(attrs) | set(recorded)):
        if key == "format_version":  # may be raised by a later minor version; the reader checks it itself
            continue
        if canonical_json(attrs.get(key)) != canonical_json(recorded.get(key)):
            out.append(
                f"{key} is {json.dumps(attrs.get(key))[:80]}, the manifest says {json.dumps(recorded.get(key))[:80]}"
            )
    return out
