"""Helpers that make error messages say what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_match(value: object, choices: Iterable[str]) -> str | None:
    """The valid choice closest to ``value`` (a likely typo of it), or ``None`` when nothing is close."""
    if not isinstance(value, str):
        return None
    names = [choice for choice in choices if isinstance(choice, str)]
    matches = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
    return matches[0] if matches else None


def close_match_hint(value: object, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest valid choice, or ``""`` when nothing is close."""
    match = close_match(value, choices)
    return f" Did you mean {match!r}?" if match else ""
