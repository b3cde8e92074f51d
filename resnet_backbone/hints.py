"""Helpers that make error messages say what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_match_hint(value: object, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid choice, or ``""`` when nothing is close."""
    if not isinstance(value, str):
        return ""
    names = [choice for choice in choices if isinstance(choice, str)]
    matches = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
    return f" Did you mean {matches[0]!r}?" if matches else ""
