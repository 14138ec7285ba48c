"""ULP scoring as tests/data/README.md defines it.

The one definition lives in ``benchmarks/ulp.py``, shared with the benchmark tables, so a
test's "4 ULP" and the report's "4 ULP" are the same number.
"""

from benchmarks.ulp import SMALLEST_NORMAL, flushed_subnormals, ulp_error

__all__ = ["SMALLEST_NORMAL", "flushed_subnormals", "ulp_error"]
