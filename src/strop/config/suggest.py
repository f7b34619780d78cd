"""Did-you-mean suggestions for misspelt keys and names."""

from __future__ import annotations

import difflib


def closest(key: str, candidates: list[str]) -> str | None:
    """The known name a misspelt one most likely meant, or None when nothing is close."""
    normal = key.replace("-", "_").strip().lower()
    if normal in candidates:
        return normal
    match = difflib.get_close_matches(normal, candidates, n=1, cutoff=0.6)
    return match[0] if match else None
