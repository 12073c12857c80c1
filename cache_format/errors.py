"""The project's one error hierarchy (zarr's `errors.py` is the model: one root, derived kinds).

The root lives here, in the cache format, because `cache_format` imports nothing of the rest of the
project; `detection.errors.UserError` derives from it, so every command catches one class:

    IcdError(ValueError)            a problem the user can fix: `.problem` and `.fix`
    +-- CacheError                  a cache that is missing, corrupt, incompatible, or a request it cannot serve
    |   +-- CorruptChunkError       stored bytes or metadata that fail their checks: names sample, level and
    |                               (`.key`) the object or metadata document at fault
    +-- detection.errors.UserError  config, data, weights, command-line input
"""

from __future__ import annotations

import errno


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
    """Stored data or metadata that fail their checks: names the sample and level, and in `key` the object
    (relative to the cache root, e.g. 'features/p3/c/1/0/0/0' or 'zarr.json') when it is known."""

    def __init__(self, problem: str, fix: str = "", key: str | None = None) -> None:
        super().__init__(problem, fix)
        self.key = key

    def __reduce__(self):
        return type(self), (self.problem, self.fix, self.key)


# errno values that describe the machine rather than a bug in this code: a full or read-only disk, missing
# permissions, a path whose components are files where directories are needed (or the reverse).
_ENVIRONMENT_FIXES = {
    errno.ENOSPC: "free space on that disk (or choose another location), then rerun; `--resume` continues "
    "an interrupted dump or training run",
    errno.EDQUOT: "free space within your quota (or choose another location), then rerun with `--resume`",
    errno.EROFS: "choose a location on a writable filesystem (OUTPUT_DIR, --cache, the destination)",
    errno.EACCES: "choose a location you may write to, or fix its permissions",
    errno.EPERM: "choose a location you may write to, or fix its permissions",
    errno.ENOTDIR: "a component of the path is a file where a directory is needed: choose another path",
    errno.EISDIR: "the path is a directory where a file is needed: choose another path",
    errno.EEXIST: "a file is in the way of a directory this command creates: choose another path or move it",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def environment_error(exc: BaseException, doing: str = "", cls: type[IcdError] = IcdError) -> IcdError | None:
    """The user-facing error for an OSError that the machine caused (full disk, read-only filesystem,
    permissions, a file in a directory's place), else None. `doing` says what failed, e.g.
    'writing the cache at /data/c'."""
    if not isinstance(exc, OSError) or exc.errno not in _ENVIRONMENT_FIXES:
        return None
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    head = f"{doing} failed: " if doing else ""
    return cls(f"{head}{reason}{where}", _ENVIRONMENT_FIXES[exc.errno])


class StoreAccessError(CacheError):
    """The store cannot be reached or refuses access (endpoint, credentials, bucket): not damage.

    Kept apart from CorruptChunkError so that `verify` never reports an outage as a damaged cache and
    a training run stops at once with the access problem instead of blaming the data.
    """
