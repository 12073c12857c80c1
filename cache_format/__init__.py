"""The teacher-feature cache format: a versioned, chunked, compressed zarr v3 store (see SPEC.md).

Depends on numpy, zarr, numcodecs, dask and fsspec only - never on torch or a detector - so that
inspecting or verifying a cache is cheap and stage one / stage two share one definition of the format.
"""

from cache_format.compat import check_compatibility
from cache_format.errors import CacheError, CorruptChunkError
from cache_format.reader import CacheReader
from cache_format.schema import FORMAT_VERSION, CachedSample, LevelSpec, SampleMeta
from cache_format.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheReader",
    "CacheWriter",
    "CachedSample",
    "CorruptChunkError",
    "LevelSpec",
    "SampleMeta",
    "check_compatibility",
]
