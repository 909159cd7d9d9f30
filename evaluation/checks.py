"""Input checks the evaluation functions share: ValueErrors that name the argument and its first bad rows."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def finite_values(values: ArrayLike, name: str, min_count: int = 0,
                  length: tuple[int, str] | None = None) -> np.ndarray:
    """``values`` as a finite (N,) float64 array of at least ``min_count`` values, and of the
    length ``length`` = (rows, name of the argument that has them) when given."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one value per row, shape (N,), got shape {x.shape}")
    if length is not None and len(x) != length[0]:
        raise ValueError(f"{name} has {len(x)} rows but {length[1]} has {length[0]}")
    if len(x) < min_count:
        raise ValueError(f"{name} has {len(x)} values; expected at least {min_count}")
    check_rows(~np.isfinite(x), x, name, "must be finite")
    return x


def check_rows(bad: np.ndarray, x: np.ndarray, name: str, expected: str) -> None:
    """ValueError naming the first five rows of ``x`` where ``bad`` holds, and their values."""
    if bad.any():
        rows = np.flatnonzero(bad)[:5]
        raise ValueError(f"{name} {expected}; {int(bad.sum())} values are not, the first at rows "
                         f"{rows.tolist()}: {x[rows].tolist()}")
