"""Suggestions for a mistyped table name."""

from __future__ import annotations

import difflib

from shmreg import _segment


def did_you_mean(name: str, candidates: list | None = None) -> str:
    """`` (did you mean 'jobs'?)`` for the closest existing table names, or ``""``."""
    if candidates is None:
        try:
            candidates = _segment.list_tables()
        except OSError:
            return ""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
