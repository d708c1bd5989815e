"""Argument checks shared by the public entry points (run before anything is traced)."""

from __future__ import annotations

import numpy as np


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as a Python int (numpy integers too: sizes and static arguments are hashed and
    compared by value and type), or a ValueError naming `name` for anything else (a bool, a
    float, a string) or a value below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
