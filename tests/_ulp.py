"""ULP scoring as ../shared/accuracy/README.md defines it."""

import numpy as np

SMALLEST_NORMAL = np.finfo(np.float32).tiny


def ulp_error(y, reference):
    """Worst ULP error over normal-range float32 entries, and the count of non-finite
    outputs where the reference is finite and within float32 range."""
    y = np.asarray(y, np.float64)
    r = np.asarray(reference, np.float64)
    with np.errstate(over="ignore"):
        in_range = (np.abs(r) >= SMALLEST_NORMAL) & np.isfinite(r.astype(np.float32))
    non_finite = int(np.sum(in_range & ~np.isfinite(y)))
    scored = in_range & np.isfinite(y)
    spacing = np.spacing(np.abs(r[scored]).astype(np.float32)).astype(np.float64)
    errors = np.abs(y[scored] - r[scored]) / spacing
    return (float(errors.max()) if errors.size else 0.0), non_finite
