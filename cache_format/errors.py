"""The project's one error hierarchy (zarr's `errors.py` is the model: one root, derived kinds).

The root lives here, in the cache format, because `cache_format` imports nothing of the rest of the
project; `detection.errors.UserError` derives from it, so every command catches one class:

    IcdError(ValueError)            a problem the user can fix: `.problem` and `.fix`
    +-- CacheError                  a cache that is missing, corrupt, incompatible, or a request it cannot serve
    |   +-- CorruptChunkError       stored bytes that fail their checksum or shape: names sample and level
    +-- detection.errors.UserError  config, data, weights, command-line input
"""
from __future__ import annotations


class IcdError(ValueError):
    """A problem with the user's input rather than a bug: its message names the problem and the fix."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)

    def __reduce__(self):  # pickled across processes (spawned ranks, DataLoader workers) as itself
        return type(self), (self.problem, self.fix)


class CacheError(IcdError):
    """A cache that is missing, corrupt, incompatible, or a request it cannot satisfy."""


class CorruptChunkError(CacheError):
    """A chunk whose checksum or shape does not match: names the sample and level."""
