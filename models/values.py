"""Feature values as they arrive from Feast, Redis or a replay, normalised to plain Python.

Feast's offline frames hold list features as numpy arrays and missing rows as NaN/None; online reads
give lists or None; the replay gives lists and numbers. The models read every value through these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def as_list(value: Any) -> list:
    """A list feature (list, tuple, numpy array) as a list; None, NaN or a missing row -> []."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, np.ndarray | tuple):
        return list(value)
    if isinstance(value, float) and math.isnan(value):
        return []
    raise TypeError(f"expected a list feature, got {type(value).__name__}")


def as_number(value: Any, default: float = 0.0) -> float:
    """A scalar feature as float; None or NaN (no row yet) -> default."""
    if value is None:
        return default
    number = float(value)
    return default if math.isnan(number) else number
