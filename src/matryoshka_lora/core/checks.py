"""Small value checks shared by the config dataclasses; this module imports nothing from the package."""

from __future__ import annotations


def is_int(v) -> bool:
    """Whether `v` is a true integer: `True`/`False` are Python ints but never a valid rank or size."""
    return isinstance(v, int) and not isinstance(v, bool)
