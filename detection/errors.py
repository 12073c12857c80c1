"""Errors a user can cause and fix: each names the problem and the fix; the CLIs exit 2 on them."""
from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input (config, data, weights, cache) rather than a bug in this code."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)
