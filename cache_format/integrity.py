"""Is a cache whole? Find every damaged object, name it, and finish a cache by writing its manifest.

`check_cache` is what `icd cache verify` and `icd dump --resume` run. Cheap checks (always): the root
and array metadata agree with each other and with the manifest, every shard's records chunk reads, the
committed samples and the records are those the manifest lists, every object the manifest lists exists
with its size (without a manifest: every object a committed sample needs exists and is whole - a feature
shard by its crc32c-checked shard index, the small per-shard chunks by being read), the array metadata
is what the root's encoding and compressor specify, the teacher weights pass their checksums. `deep=True` also reads every committed sample, checking each chunk's crc32c and
the records' per-level checksums, as a training run would. Each finding names the object at fault,
relative to the cache root, and says whether rewriting its shard repairs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from cache_format.arrays import CacheArrays, codec_problems, layout_problems, open_arrays
from cache_format.checksums import instances_crc, level_crc
from cache_format.encodings import parse_encoding
from cache_format.errors import CacheError, CorruptChunkError, StoreAccessError
from cache_format.manifest import (
    MANIFEST_KEY,
    committed_mask,
    delete_manifest,
    load_manifest,
    records_crc,
    root_differences,
    write_manifest,
)
from cache_format.objects import (
    delete_objects,
    metadata_key,
    object_sizes,
    shard_arrays,
    shard_index_problems,
    shard_key,
    single_chunk_key,
)
from cache_format.opening import open_root
from cache_format.remote import access_error, default_workers
from cache_format.schema import (
    COL,
    FORMAT_VERSION,
    MANIFEST_SINCE,
    RECORD_FIELDS,
    WEIGHTS_GROUP,
    Layout,
    layout_from_attributes,
    levels_from_attributes,
    parse_version,
    quant_columns,
)
from cache_format.weights import COMPLETE, INCOMPLETE, UNCHECKED, read_weights, weights_digest, weights_state

# Damage kinds: what repairs it.
SHARD = "shard"  # rewrite the shard (stage one recomputes its samples)
TEACHER_WEIGHTS = "teacher_weights"  # store the teacher weights again
METADATA = "metadata"  # a zarr.json that disagrees: restore it from a copy, or re-create the cache
MANIFEST = "manifest"  # the manifest itself: a finishing dump writes a new one


@dataclass(frozen=True)
class Damage:
    key: str  # the object or metadata document, relative to the cache root
    message: str
    kind: str
    shard: int | None = None


@dataclass
class IntegrityReport:
    url: str
    format_version: str
    num_samples: int
    committed: np.ndarray  # bool [num_samples]
    manifest: dict[str, Any] | None
    weights: str  # weights.ABSENT / INCOMPLETE / UNCHECKED / COMPLETE
    damage: list[Damage] = field(default_factory=list)
    checked_levels: int = 0  # sample-levels read by the deep check
    layout: Layout | None = None

    def committed_shards(self) -> list[int]:
        """Shards holding at least one committed sample."""
        assert self.layout is not None
        return [s for s in range(self.layout.num_shards) if self.committed[self.layout.shard_range(s)].any()]

    @property
    def finished(self) -> bool:
        return self.manifest is not None

    @property
    def pre_manifest(self) -> bool:
        """Written by a version before manifests existed (format 1.0)."""
        return parse_version(self.format_version) < MANIFEST_SINCE

    def damaged_shards(self) -> list[int]:
        return sorted({d.shard for d in self.damage if d.kind == SHARD and d.shard is not None})

    def of_kind(self, kind: str) -> list[Damage]:
        return [d for d in self.damage if d.kind == kind]


def _samples(layout: Layout, shard: int, indices=None) -> str:
    rng = layout.shard_range(shard)
    if indices is None:
        return f"shard {shard}, samples {rng.start}-{rng.stop - 1}"
    indices = [int(i) for i in indices]
    shown = ", ".join(map(str, indices[:6])) + (f" and {len(indices) - 6} more" if len(indices) > 6 else "")
    return f"shard {shard}, sample{'s' if len(indices) > 1 else ''} {shown}"


def _read_records(arrays: CacheArrays, layout: Layout, url: str) -> tuple[np.ndarray, list[int]]:
    """All records (NaN where unreadable) and the shards whose records chunk cannot be read.

    An unreachable store or refused access raises StoreAccessError: an outage is not damage."""
    try:
        return np.asarray(arrays.records[...]), []
    except Exception as exc:
        denied = access_error(exc, url)
        if denied is not None:
            raise denied from exc
    out = np.full(arrays.records.shape, np.nan)
    bad = []
    for s in range(layout.num_shards):
        rng = layout.shard_range(s)
        try:
            out[rng.start : rng.stop] = arrays.records[rng.start : rng.stop]
        except Exception:
            bad.append(s)
    return out, bad


def check_cache(url: str, deep: bool = False, workers: int | None = None) -> IntegrityReport:
    """Every damaged object of the cache at `url` (never raises for damage; raises CacheError for a store
    that is not a cache at all, or one of a newer format)."""
    store, root, attrs = open_root(str(url), read_only=True)
    levels = levels_from_attributes(attrs)
    layout = layout_from_attributes(attrs)
    encoding = parse_encoding(attrs["encoding"])
    report = IntegrityReport(
        str(url),
        str(attrs["format_version"]),
        layout.num_samples,
        np.zeros(layout.num_samples, bool),
        None,
        weights_state(root),
        layout=layout,
    )
    damage = report.damage
    try:
        report.manifest = load_manifest(root, url)
    except CorruptChunkError:
        damage.append(Damage(MANIFEST_KEY, "damaged: it fails its own digest (edited or partly overwritten)", MANIFEST))
    manifest = report.manifest

    # 1. metadata: the root, the arrays and the manifest must agree; past this, nothing can be trusted.
    if manifest is not None:
        for line in root_differences(attrs, manifest):
            damage.append(Damage("zarr.json", f"{line} (an edited root attribute)", METADATA))
    try:
        arrays = open_arrays(root, levels, encoding, str(url))
    except CorruptChunkError as exc:
        damage.append(Damage(exc.key or "zarr.json", exc.problem.split(": ", 1)[-1], METADATA))
        return report
    for key, message in layout_problems(arrays, levels, layout) or codec_problems(
        arrays, levels, layout, encoding, str(attrs["compressor"])
    ):
        damage.append(Damage(key, message, METADATA))
    by_path = shard_arrays(arrays)
    if manifest is not None:
        for path, arr in by_path.items():
            want = manifest["arrays"].get(path)
            if want is None or list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
                damage.append(
                    Damage(
                        metadata_key(path),
                        f"shape {list(arr.shape)} {arr.dtype}, the manifest says "
                        f"{want and want['shape']} {want and want['dtype']}",
                        METADATA,
                    )
                )
    if report.of_kind(METADATA):
        return report

    # 2. records: readable, and (finished caches) the committed samples and values the dump finished with.
    records, unreadable = _read_records(arrays, layout, str(url))
    report.committed = records[:, COL["committed"]] == 1.0
    for s in unreadable:
        damage.append(Damage(shard_key(arrays.records, s), f"cannot be read ({_samples(layout, s)})", SHARD, s))
    if manifest is not None:
        expected = committed_mask(manifest)
        for s in range(layout.num_shards):
            if s in unreadable:
                continue
            rng = layout.shard_range(s)
            lost = np.flatnonzero(expected[rng] & ~report.committed[rng]) + rng.start
            extra = np.flatnonzero(~expected[rng] & report.committed[rng]) + rng.start
            if len(lost):
                damage.append(
                    Damage(
                        shard_key(arrays.records, s),
                        f"{_samples(layout, s, lost)} committed when the "
                        "dump finished are not committed now (a deleted or replaced records chunk)",
                        SHARD,
                        s,
                    )
                )
            elif len(extra):
                damage.append(
                    Damage(
                        shard_key(arrays.records, s),
                        f"{_samples(layout, s, extra)} are committed but were not when the dump finished",
                        SHARD,
                        s,
                    )
                )
            elif records_crc(records[rng]) != int(manifest["records_crc32c"][s]):
                damage.append(
                    Damage(
                        shard_key(arrays.records, s),
                        f"the records of {_samples(layout, s)} differ from those the dump finished with",
                        SHARD,
                        s,
                    )
                )

    # 3. objects: each exists with the size the manifest lists (without one: each a committed sample needs).
    keys = {(path, s): shard_key(arr, s) for path, arr in by_path.items() for s in range(layout.num_shards)}
    sizes = object_sizes(store, keys.values())
    quant_rows = None
    feature_paths = {arr.path for arr in arrays.features.values()}
    present: dict[str, dict[str, int]] = {}  # without a manifest: feature shard objects to check
    for (path, s), key in keys.items():
        size = sizes[key]
        if manifest is not None:
            want = manifest["arrays"][path]["objects"][s]
            if want is not None and size is None:
                damage.append(
                    Damage(key, f"missing; the finished dump wrote {want} bytes ({_samples(layout, s)})", SHARD, s)
                )
            elif want != size:
                damage.append(
                    Damage(
                        key,
                        f"{'present' if want is None else 'size'} {size} bytes, the finished dump "
                        f"wrote {want if want is not None else 'none'} (truncated, replaced or "
                        f"stray; {_samples(layout, s)})",
                        SHARD,
                        s,
                    )
                )
            continue
        if s in unreadable:
            continue
        rng = layout.shard_range(s)
        rows = records[rng][report.committed[rng]]
        if not len(rows) or path == arrays.records.path:
            continue
        if size is not None:
            # No manifest lists its size: the object must prove itself whole, cheaply (a feature shard by
            # its crc32c-checked index, the small per-shard chunks by being read).
            if path in feature_paths:
                present.setdefault(path, {})[key] = size
            else:
                try:
                    by_path[path][_block(by_path[path], s)]
                except StoreAccessError:
                    raise
                except Exception as exc:
                    denied = access_error(exc, str(url))
                    if denied is not None:
                        raise denied from exc
                    damage.append(Damage(key, f"cannot be read: {_reason(exc)} ({_samples(layout, s)})", SHARD, s))
            continue
        if arrays.quant is not None and path == arrays.quant.path:
            damage.append(Damage(key, f"missing ({_samples(layout, s)} are committed)", SHARD, s))
        elif path in (arrays.boxes.path, arrays.classes.path):
            # All-zero rows (class 0, boxes at the origin) are legitimately absent too: check the checksums.
            if not _instances_match(arrays, layout, s, records, report.committed):
                damage.append(Damage(key, f"missing ({_samples(layout, s)} have instances)", SHARD, s))
        else:
            # A feature shard that was all padding / all zeros is legitimately absent (write_empty_chunks off):
            # missing only if some committed sample's checksum is not that of zeros.
            if quant_rows is None and arrays.quant is not None:
                try:
                    quant_rows = np.asarray(arrays.quant[...])
                except Exception:
                    quant_rows = np.full(arrays.quant.shape, np.nan, np.float32)
            li = next(i for i, lv in enumerate(levels) if by_path[path] is arrays.features[lv.name])
            lv = levels[li]
            cols = quant_columns(levels)[lv.name]
            for i in np.flatnonzero(report.committed[rng]) + rng.start:
                h, w = lv.valid_size(int(records[i, COL["resized_h"]]), int(records[i, COL["resized_w"]]))
                q = None if quant_rows is None else quant_rows[i, cols[0] : cols[1]].reshape(2, -1)
                zeros = np.zeros((lv.channels, h, w), encoding.stored_dtype)
                if level_crc(zeros, q) != int(records[i, len(RECORD_FIELDS) + li]):
                    damage.append(Damage(key, f"missing ({_samples(layout, s)} are committed)", SHARD, s))
                    break

    for path, found in present.items():
        for key, problem in shard_index_problems(store, by_path[path], found).items():
            s = next(s for (p, s), k in keys.items() if k == key)
            damage.append(Damage(key, f"{problem} ({_samples(layout, s)})", SHARD, s))

    # 4. teacher weights: checksums per tensor, the set against the manifest, objects against their sizes.
    listed = (manifest or {}).get("teacher_weights")
    if report.weights in (COMPLETE, UNCHECKED) or listed:
        try:
            read_weights(root, str(url), manifest)
        except CorruptChunkError as exc:
            damage.append(
                Damage(
                    exc.key or metadata_key(WEIGHTS_GROUP),
                    exc.problem.split(": ", 1)[-1].replace(f" ({exc.key})", ""),
                    TEACHER_WEIGHTS,
                )
            )
        except StoreAccessError:
            raise
        except CacheError:
            pass

    # 5. deep: read every committed sample of every shard not already known to be damaged.
    if deep:
        _deep_check(report, arrays, layout, workers)
    return report


def _block(array, shard: int) -> tuple[slice, ...]:
    """The selection of `array` stored in shard `shard`'s one object."""
    first = (array.shards or array.chunks)[0]
    return (slice(shard * first, (shard + 1) * first),) + (slice(None),) * (array.ndim - 1)


def _reason(exc: BaseException) -> str:
    if "checksum do not match" in str(exc):
        return "its bytes fail their crc32c (truncated or altered)"
    return f"{type(exc).__name__}: {exc}"


def _instances_match(
    arrays: CacheArrays, layout: Layout, shard: int, records: np.ndarray, committed: np.ndarray
) -> bool:
    """Whether every committed sample of the shard reads back instances matching its checksum."""
    rows_per_shard = layout.instance_rows_per_shard
    base = shard * rows_per_shard
    try:
        boxes = np.asarray(arrays.boxes[base : base + rows_per_shard])
        classes = np.asarray(arrays.classes[base : base + rows_per_shard])
    except Exception:
        return False
    for i in layout.shard_range(shard):
        if committed[i]:
            start, n = int(records[i, COL["instance_start"]]), int(records[i, COL["instance_count"]])
            if instances_crc(boxes[start : start + n], classes[start : start + n]) != int(
                records[i, COL["instance_crc"]]
            ):
                return False
    return True


def _instance_keys_at_fault(arrays: CacheArrays, layout: Layout, shard: int) -> list[str]:
    """Which of the shard's boxes / classes objects fails to read (both named when neither fails alone:
    then their values disagree with the records' checksum)."""
    rows = layout.instance_rows_per_shard
    bad = []
    for arr in (arrays.boxes, arrays.classes):
        try:
            arr[shard * rows : (shard + 1) * rows]
        except Exception:
            bad.append(shard_key(arr, shard))
    return bad or [shard_key(arrays.boxes, shard), shard_key(arrays.classes, shard)]


def _deep_check(report: IntegrityReport, arrays: CacheArrays, layout: Layout, workers: int | None) -> None:
    from cache_format.reader import CacheReader  # the reader is what a training run uses: check through it

    reader = CacheReader(report.url, check_manifest=False)
    skip = set(report.damaged_shards())
    shards = [s for s in range(layout.num_shards) if s not in skip and report.committed[layout.shard_range(s)].any()]
    tasks = [dask.delayed(_deep_check_shard)(reader, arrays, layout, s, report.committed) for s in shards]
    workers = workers or default_workers(report.url)
    for checked, found in dask.compute(*tasks, scheduler="threads", num_workers=workers) if tasks else []:
        report.checked_levels += checked
        report.damage.extend(found)


def _detail(exc: CacheError) -> str:
    """The problem without its 'cache URL: sample i level L: ' prefix (the report says where)."""
    text = re.sub(r"^cache .*?: sample \d+( level \S+)?: ", "", exc.problem)
    if "checksum do not match" in text:  # zarr's crc32c codec, with the raw checksum bytes
        return "its bytes fail their crc32c (altered or partly overwritten)"
    return text


def _deep_check_shard(
    reader, arrays: CacheArrays, layout: Layout, shard: int, committed: np.ndarray
) -> tuple[int, list[Damage]]:
    found: dict[str, list] = {}
    checked = 0
    quant_key = None if arrays.quant is None else shard_key(arrays.quant, shard)

    def shared_block(exc: CacheError) -> str | None:
        """The records or int8-scales chunk at fault when the error is about that block: every read of
        the shard fails through it, and only it is damaged (never blame the features or instances)."""
        if quant_key and "int8 scales" in exc.problem:
            return quant_key
        if "records chunk" in exc.problem:
            return shard_key(arrays.records, shard)
        return None

    for i in layout.shard_range(shard):
        if not committed[i]:
            continue
        for name in reader.level_names:
            checked += 1
            try:
                reader.read_level(i, name)
            except StoreAccessError:
                raise  # an outage or refused access is not damage: the whole check stops (exit 2)
            except CacheError as exc:
                key = shared_block(exc) or shard_key(arrays.features[name], shard)
                found.setdefault(key, []).append((i, name, _detail(exc)))
        try:
            reader.read_instances(i)
        except StoreAccessError:
            raise
        except CacheError as exc:
            block = shared_block(exc)
            if block is not None:  # already named by the levels' reads of this sample
                if not any(j == i for j, _, _ in found.get(block, [])):
                    found.setdefault(block, []).append((i, "instances", _detail(exc)))
                continue
            for key in _instance_keys_at_fault(arrays, layout, shard):
                found.setdefault(key, []).append((i, "instances", _detail(exc)))
    out = []
    for key, items in found.items():
        samples = sorted({i for i, _, _ in items})
        what = sorted({name for _, name, _ in items})
        out.append(
            Damage(key, f"{_samples(layout, shard, samples)} level {', '.join(what)}: {items[0][2]}", SHARD, shard)
        )
    return checked, out


def finish_cache(url: str) -> dict[str, Any]:
    """Write the manifest of a cache whose dump has written everything it will: the last write, after a
    cheap check that every committed sample's objects and the teacher weights are in place.

    A cache of an older minor format (1.0) is raised to this one first. Samples still uncommitted are
    recorded as such (stage one's unreadable images). Raises CorruptChunkError naming what is damaged.
    """
    url = str(url)
    store, root, attrs = open_root(url, read_only=False)
    if parse_version(attrs["format_version"]) < parse_version(FORMAT_VERSION):
        root.attrs.update({"format_version": FORMAT_VERSION})
        attrs = dict(root.attrs.asdict())
    report = check_cache(url)
    real = [d for d in report.damage if d.kind != MANIFEST]
    if real:
        raise CorruptChunkError(
            f"cache {url} cannot be finished: " + "; ".join(f"{d.key}: {d.message}" for d in real[:5]),
            "run `icd dump ... --resume --repair` to rewrite the damaged parts",
            key=real[0].key,
        )
    if report.weights == UNCHECKED:
        raise CacheError(
            f"cache {url}: its teacher weights were stored without checksums (format 1.0)",
            "run `icd dump ... --resume`, which stores them again with checksums",
        )
    levels = levels_from_attributes(attrs)
    layout = layout_from_attributes(attrs)
    arrays = open_arrays(root, levels, parse_encoding(attrs["encoding"]), url, layout)
    records, _ = _read_records(arrays, layout, str(url))
    by_path = shard_arrays(arrays)
    keys = {path: [shard_key(arr, s) for s in range(layout.num_shards)] for path, arr in by_path.items()}
    sizes = object_sizes(store, [k for ks in keys.values() for k in ks])
    teacher = None
    if report.weights == COMPLETE:
        state = read_weights(root, url)
        group = root[WEIGHTS_GROUP]
        wkeys = {name: single_chunk_key(group[name]) for name in state}
        wsizes = object_sizes(store, wkeys.values())
        teacher = {
            "names": list(group.attrs["names"]),
            "sha256": weights_digest(state),
            "objects": {name: wsizes[k] for name, k in wkeys.items()},
        }
    elif report.weights == INCOMPLETE:
        raise CacheError(
            f"cache {url}: its teacher weights are incomplete (an interrupted write)",
            "run `icd dump ... --resume`, which stores them again",
        )
    body = {
        "format_version": FORMAT_VERSION,
        "root_attributes": attrs,
        "num_samples": layout.num_samples,
        "committed": int(report.committed.sum()),
        "uncommitted": [int(i) for i in np.flatnonzero(~report.committed)],
        "records_crc32c": [records_crc(records[layout.shard_range(s)]) for s in range(layout.num_shards)],
        "arrays": {
            path: {"shape": list(arr.shape), "dtype": str(arr.dtype), "objects": [sizes[k] for k in keys[path]]}
            for path, arr in by_path.items()
        },
        "teacher_weights": teacher,
    }
    return write_manifest(store, body)


def uncommit_shards(url: str, shards: list[int]) -> list[str]:
    """Make damaged shards unwritten, so that a resumed dump writes them again whole: their records chunk
    is deleted first (the samples become invisible), then every other object of the shard. Returns the keys.
    The manifest is deleted before anything else."""
    store, root, attrs = open_root(str(url), read_only=False)
    arrays = open_arrays(root, levels_from_attributes(attrs), parse_encoding(attrs["encoding"]), str(url))
    delete_manifest(store)  # the cache stops being vouched for before anything of it is removed
    deleted = []
    for s in shards:
        keys = [shard_key(arrays.records, s)] + [
            shard_key(a, s) for p, a in shard_arrays(arrays).items() if a is not arrays.records
        ]
        delete_objects(store, keys)
        deleted += keys
    return deleted
