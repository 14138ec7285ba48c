"""The one table of polynomial coefficients and float32 constants, for the pure-JAX code and
the CPU kernels alike.

``arithmetic.py`` evaluates them in JAX; the build (``hatch_build.py``) writes ``CPP_NAMES``
into ``_cpu/_cpu_coefficients.h``, which ``_cpu/_cpu_kernels.cc`` includes, so the kernels
hold no number of their own. The build reads this file without importing the package (its
build environment has no JAX), so it imports nothing.

The polynomials are Chebyshev interpolants at 300 nodes against mpmath, rounded to float32;
regenerate them with ``numpy.polynomial.chebyshev.chebfit`` and ``cheb2poly``
(Trefethen, *Approximation Theory and Approximation Practice*, 2013).
"""

from __future__ import annotations

# (log1p(t) - t) / t^2 on [0, exp(-1)], degree 6 (max error 8.2e-9, against values near
# -1/2).
LOG1P_QUOTIENT_FLOAT32 = (
    -0.5,
    0.3333322,
    -0.24994957,
    0.19913994,
    -0.15951239,
    0.11082395,
    -0.04537416,
)
# (softplus(u) - log(2) - u / 2) / u^2 as a polynomial in u^2 on [0, 1], degree 4 (max
# error 7.1e-10, against values near 1/8).
SOFTPLUS_NEAR_ZERO_FLOAT32 = (0.125, -0.005208319, 0.00034710768, -2.602335e-05, 1.7423902e-06)
# Softplus takes that polynomial for |u| < SOFTPLUS_NEAR_ZERO_BOUND, the log1p form above.
SOFTPLUS_NEAR_ZERO_BOUND = 1.0
# log(2) = LOG2_HI + LOG2_LO to twice float32's precision.
LOG2_HI = 0.6931472
LOG2_LO = -1.9046542e-09
# (expm1(r) - r) / r^2 on |r| <= log(2) / 2 (widened by 1%), degree 4 (max error 6.9e-8
# against values near 1/2, so below 1e-8 relative in exp(r)).
EXPM1_QUOTIENT_FLOAT32 = (0.5, 0.16666573, 0.041666456, 0.008363777, 0.0013934545)
# The same quotient to degree 6 (max error 1.7e-9): the CPU kernel's sigmoid-from-output
# needs expm1 to its own relative precision where it is small. The pure-JAX path gets
# that from the Taylor polynomial of ``neg_expm1`` instead.
EXPM1_QUOTIENT_DEGREE6_FLOAT32 = (
    0.5,
    0.16666667,
    0.041666668,
    0.008333297,
    0.0013888837,
    0.00019900444,
    2.4869207e-05,
)
# Cody-Waite reduction a = k log(2) + r (Cody and Waite, *Software Manual for the
# Elementary Functions*, 1980): k = round(a * LOG2_E), and log(2) = LN2_HI16 + LN2_LO with
# LN2_HI16 on 16 bits, so that k * LN2_HI16 is exact.
LOG2_E = 1.4426950216293335
LN2_HI16 = 0.693145751953125
LN2_LO = 1.428606765330187e-06
# 1.5 * 2^23: float32 x + ROUND_SHIFT - ROUND_SHIFT is x rounded to an integer (ties to
# even) for |x| < 2^22, and the sum's low mantissa bits hold that integer.
ROUND_SHIFT = 12582912.0
# exp(a) with its rounding error (exp_pair_float32, the kernels' ExpPair) clamps a at this
# floor: below it exp(a) is under float32's smallest normal, and k stays a normal power's.
EXP_PAIR_FLOOR = -88.0
# The kernels' exp(t) clamps t at this floor (exp is 0 there, subnormals included) so that
# k stays in the range their 2^k scaling handles.
EXP_FLOOR = -140.0
# The kernels' exp(x - shift) raises x to shift - EXP_SHIFT_MARGIN, which keeps x - shift
# finite and exact for x = -inf and far below (exp is 0 there either way).
EXP_SHIFT_MARGIN = 128.0
# From a row max of this magnitude on, every x that exp does not take to 0 lies within a
# factor of two of the max, so x - max is exact (Sterbenz) and needs no TwoSum.
WIDE_SHIFT = 1024.0

# The kernels' names for the constants above (scalars, and arrays for the polynomials, in
# increasing degree), which the build writes into their header.
CPP_NAMES: dict[str, tuple[float, ...] | float] = {
    "kLog1pQ": LOG1P_QUOTIENT_FLOAT32,
    "kNearZero": SOFTPLUS_NEAR_ZERO_FLOAT32,
    "kNearZeroBound": SOFTPLUS_NEAR_ZERO_BOUND,
    "kLog2Hi": LOG2_HI,
    "kLog2Lo": LOG2_LO,
    "kQ": EXPM1_QUOTIENT_FLOAT32,
    "kExpm1Q": EXPM1_QUOTIENT_DEGREE6_FLOAT32,
    "kLog2E": LOG2_E,
    "kLn2Hi": LN2_HI16,
    "kLn2Lo": LN2_LO,
    "kRoundShift": ROUND_SHIFT,
    "kExpPairFloor": EXP_PAIR_FLOOR,
    "kExpFloor": EXP_FLOOR,
    "kExpShiftMargin": EXP_SHIFT_MARGIN,
    "kWideShift": WIDE_SHIFT,
}
