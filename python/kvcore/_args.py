"""Argument conversion shared by the Python layers (ops, the paged cache, the policies)."""

from __future__ import annotations

import operator
from typing import Any, Optional


def as_index(value: Any) -> Optional[int]:
    """``value`` as a Python int if it is integer-like (an int, a numpy integer, a 0-d integer
    tensor: anything with ``__index__``), never a bool or a float (``int(3.5)`` would silently be
    3); None otherwise, for the caller's own error naming the argument."""
    if type(value) is int:  # the common case, kept cheap (decode steps pass ids every step)
        return value
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
