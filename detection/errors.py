"""Errors a user can cause and fix: each names the problem and the fix; the CLIs exit 2 on them."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(ValueError):
    """A problem with the user's input (config, data, weights, cache) rather than a bug in this code."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


def run_command(command: str, body: Callable[[], object], interrupted: str = "") -> int:
    """Run one `icd <command>`: a user's error prints `icd <command>: error: ...` and exits 2.

    cache_format's CacheError carries the same problem/fix (it is a separate class only so that the
    cache format imports nothing from detection). Ctrl-C exits 130 with `interrupted` as the advice.
    """
    from cache_format.errors import CacheError

    try:
        body()
    except (UserError, CacheError) as exc:
        print(f"icd {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"icd {command}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return 130
    return 0
