"""Error scores against float64 references, as tests/data/README.md defines them.

The tests import :func:`ulp_error` from here (through ``tests/_ulp.py``), so the benchmark
tables and the accuracy tests can never disagree about what "4 ULP" means.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def _in_normal_range(r: np.ndarray) -> np.ndarray:
    # A reference beyond float32's range cannot be the target of a float32 result, and one
    # below the smallest normal is scored separately (XLA on CPU flushes subnormals to 0).
    with np.errstate(over="ignore"):
        return (np.abs(r) >= SMALLEST_NORMAL) & np.isfinite(r.astype(np.float32))


def ulp_error(y: ArrayLike, reference: ArrayLike) -> tuple[float, int]:
    """Worst ULP error over normal-range float32 entries, and the count of non-finite
    outputs where the reference is finite and within float32 range."""
    y = np.asarray(y, np.float64)
    r = np.asarray(reference, np.float64)
    in_range = _in_normal_range(r)
    non_finite = int(np.sum(in_range & ~np.isfinite(y)))
    scored = in_range & np.isfinite(y)
    # The README's formula, as written: at |r| = float32's max the spacing overflows to inf,
    # so such an entry scores 0 ULP (it has no float32 neighbour above it).
    with np.errstate(over="ignore"):
        spacing = np.spacing(np.abs(r[scored]).astype(np.float32)).astype(np.float64)
    errors = np.abs(y[scored] - r[scored]) / spacing
    return (float(errors.max()) if errors.size else 0.0), non_finite


def flushed_subnormals(y: ArrayLike, reference: ArrayLike) -> int:
    """How many true subnormals came back as 0: entries whose reference rounds to a nonzero
    float32 below the smallest normal, where the output is exactly 0."""
    y = np.asarray(y, np.float64)
    r = np.asarray(reference, np.float64)
    # Rounding to float32 tells "a subnormal" from "so small that float32 holds only 0".
    with np.errstate(over="ignore"):
        subnormal = (np.abs(r) < SMALLEST_NORMAL) & (r.astype(np.float32) != 0)
    return int(np.sum(subnormal & (y == 0)))


def worst_relative_error(y: ArrayLike, reference: ArrayLike) -> float:
    """Worst ``|y - r| / |r|`` over the given entries (``inf`` where r is 0 and y is not)."""
    y = np.asarray(y, np.float64)
    r = np.asarray(reference, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(y == r, 0.0, np.abs(y - r) / np.abs(r))
    rel = np.where(np.isnan(rel), np.inf, rel)
    return float(rel.max()) if rel.size else 0.0
