"""Errors raised by the cache format: a message naming the problem and the fix.

Kept separate from detection.errors so that cache_format imports no detection code; the CLIs catch
both (they share the `.problem` / `.fix` attributes).
"""
from __future__ import annotations


class CacheError(ValueError):
    """A cache that is missing, corrupt, incompatible, or a request it cannot satisfy."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


class CorruptChunkError(CacheError):
    """A chunk whose checksum or shape does not match: names the sample and level."""


class StoreAccessError(CacheError):
    """The store cannot be reached or refuses access (endpoint, credentials, bucket): not damage.

    Kept apart from CorruptChunkError so that `verify` never reports an outage as a damaged cache and
    a training run stops at once with the access problem instead of blaming the data.
    """
