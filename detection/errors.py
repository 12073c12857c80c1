"""Errors a user can cause and fix in the detection code (config, datasets, weights, command line).

`UserError` derives from the project's one root, `cache_format.errors.IcdError`, which the cache format
defines because it imports nothing of the rest of the project; every command catches that root
(detection.engine.commands.run_command) and exits 2 with the problem and the fix.
"""

from __future__ import annotations

from cache_format.errors import IcdError


class UserError(IcdError):
    """A problem with the user's input (config, data, weights) rather than a bug in this code."""
