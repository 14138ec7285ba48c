"""Exact float arithmetic, and the one table of polynomial coefficients.

Error-free transformations (Knuth's TwoSum, Dekker's split and product), correctly scaled
exponentials and the polynomials the ops evaluate instead of XLA's ``exp``, ``log1p`` and
``expm1`` where those round too coarsely. The coefficients are ``coefficients.py``'s table,
re-exported here; the CPU kernels get the same table through the header the build writes
from it (``hatch_build.py``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from stablelayers._core.coefficients import (
    CPP_NAMES,
    EXP_PAIR_FLOOR,
    EXPM1_QUOTIENT_DEGREE6_FLOAT32,
    EXPM1_QUOTIENT_FLOAT32,
    LN2_HI16,
    LN2_LO,
    LOG1P_QUOTIENT_FLOAT32,
    LOG2_E,
    LOG2_HI,
    LOG2_LO,
    SOFTPLUS_NEAR_ZERO_BOUND,
    SOFTPLUS_NEAR_ZERO_FLOAT32,
)

# The table's names are re-exported: the ops import the coefficients from here.
__all__ = [
    "CPP_NAMES",
    "EXPM1_QUOTIENT_DEGREE6_FLOAT32",
    "EXPM1_QUOTIENT_FLOAT32",
    "EXP_PAIR_FLOOR",
    "LN2_HI16",
    "LN2_LO",
    "LOG1P_QUOTIENT_FLOAT32",
    "LOG1P_SERIES_DEGREE",
    "LOG2_E",
    "LOG2_HI",
    "LOG2_LO",
    "NEG_EXPM1_QUOTIENT",
    "SOFTPLUS_NEAR_ZERO_BOUND",
    "SOFTPLUS_NEAR_ZERO_FLOAT32",
    "compute_dtype",
    "exp_corrected",
    "exp_corrected_parts",
    "exp_pair_float32",
    "exp_parts_float32",
    "exp_share",
    "format_bits",
    "horner",
    "log1p_unit",
    "neg_expm1",
    "opaque_identity",
    "reciprocal_of_pair",
    "reciprocal_pair",
    "two_sum_error",
    "veltkamp_split",
]

# -expm1(-v) = v + v^2 * P(v) on [0, log 2], with the Taylor series P(v) = sum_{k >= 2}
# (-v)^(k - 2) * (-1/k!), to degree 11 for float32 and 17 for float64 (truncation below
# 5e-11 and 1e-18 relative).
NEG_EXPM1_QUOTIENT = {
    bits: tuple((-1.0) ** (k + 1) / math.factorial(k) for k in range(2, degree + 1))
    for bits, degree in ((32, 11), (64, 17))
}
LOG1P_SERIES_DEGREE = 18


def compute_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    """float16 and bfloat16 are computed in float32; other float types as themselves."""
    if jnp.finfo(dtype).bits < 32:
        return np.dtype(np.float32)
    return np.dtype(dtype)


def format_bits(dtype: DTypeLike) -> tuple[int, int]:
    """``(exponent bits, mantissa bits)`` of a float format, as ``reduce_precision`` takes
    them."""
    info = jnp.finfo(dtype)
    return info.nexp, info.nmant


def opaque_identity(x: jax.Array) -> jax.Array:
    """``x`` itself (reduce_precision to its own format), as a value XLA cannot simplify
    through: ``(1 + t) - 1`` stays a rounding, and work recomputed from it is not merged
    with work done on ``x``."""
    return lax.reduce_precision(x, *format_bits(x.dtype))


def two_sum_error(a: jax.Array, b: jax.Array, total: jax.Array) -> jax.Array:
    """The exact rounding error of ``total = a + b`` (Knuth's TwoSum), 0 where ``total``
    is not finite.

    It is identically zero as a function of ``a`` and ``b``, hence stop_gradient is exact.
    """
    b_virtual = total - a
    err = (a - (total - b_virtual)) + (b - b_virtual)
    return lax.stop_gradient(jnp.where(jnp.isfinite(total), err, 0))


def exp_corrected(d: jax.Array, err: jax.Array) -> jax.Array:
    """``exp(d + err)`` for ``|err| <= ulp(d) / 2``: ``exp(d) * (1 + err)`` to first order.

    Scaling by ``(1 + err)`` rather than adding ``exp(d) * err`` keeps the correction for
    results near the bottom of the normal range, where the product would flush to zero.
    """
    return jnp.exp(d) * (1 + err)


def exp_corrected_parts(d: jax.Array, err: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(s, s_lo, scale)`` with ``(s + s_lo) * scale = exp(d + err)`` to about twice
    float32's precision, for ``d <= 0`` and ``|err| <= ulp(d) / 2``:
    :func:`exp_parts_float32` in float32 (XLA's ``exp`` is only within an ulp, a relative
    error every softmax entry would inherit), ``(exp_corrected(d, err), 0, 1)`` in
    float64."""
    if d.dtype != jnp.float32:
        e = exp_corrected(d, err)
        return e, jnp.zeros_like(e), jnp.ones_like(e)
    return exp_parts_float32(d, err)


def exp_share(
    d: jax.Array, err: jax.Array, r: jax.Array, r_lo: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(exp(d + err) * (r + r_lo), exp(d + err))``, the first rounded once: a softmax
    entry from its shifted logit and the reciprocal of the row total as a float pair.

    ``exp`` comes in parts (:func:`exp_corrected_parts`) and the power of two is applied
    last, so the low parts are not flushed to zero for entries near the bottom of the normal
    range. The opaque identity keeps XLA from refactoring the sum into ``s * (r + r_lo)``,
    where ``r_lo`` would round away. The second value (rounded as XLA rounds it) is for
    telling entries without mass (0) from the rest.
    """
    s, s_lo, scale = exp_corrected_parts(d, err)
    return (s * r + opaque_identity(s * r_lo + s_lo * r)) * scale, s * scale


def reciprocal_of_pair(total: jax.Array, total_lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(r, r_lo)`` with ``r + r_lo = 1 / (total + total_lo)`` to about twice the working
    precision, for ``|total_lo| <= ulp(total)``: :func:`reciprocal_pair` of ``total``, less
    the first-order term ``total_lo / total^2``."""
    r, r_lo = reciprocal_pair(total)
    return r, r_lo - lax.stop_gradient(total_lo * r) * r


def veltkamp_split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi, lo)`` with ``a = hi + lo`` exactly, each with at most half of the format's
    significand bits, so that products of halves are exact (Dekker, 1971)."""
    c = (2.0 ** ((jnp.finfo(a.dtype).nmant + 2) // 2) + 1) * a
    hi = c - (c - a)
    return hi, a - hi


def reciprocal_pair(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(r, r_lo)`` with ``r + r_lo = 1 / t`` to about twice the working precision.

    ``r = 1 / t`` rounded, and ``r_lo = (1 - t * r) / t``, where ``1 - t * r`` is exact:
    Dekker's product gives ``t * r`` as ``p + p_err`` exactly, and ``1 - p`` is exact
    (Sterbenz) since ``p`` is within an ulp of 1. Used on row totals only, so it costs
    nothing per entry; multiplying an entry by ``r`` alone would add the rounding of ``r``
    to the rounding of the product (XLA turns ``e / total`` into ``e * (1 / total)``).
    """
    r = 1 / t
    p = t * r
    t_hi, t_lo = veltkamp_split(t)
    r_hi, r_lo = veltkamp_split(r)
    p_err = ((t_hi * r_hi - p) + t_hi * r_lo + t_lo * r_hi) + t_lo * r_lo
    return r, lax.stop_gradient(((1 - p) - p_err) * r)


def horner(coefficients: tuple[float, ...], z: jax.Array) -> jax.Array:
    """``sum_k coefficients[k] * z^k``."""
    result = jnp.full_like(z, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * z + c
    return result


def exp_pair_float32(a: jax.Array, err: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(t, t_lo)`` with ``t + t_lo = exp(a)`` to about 2^-30 relative, for ``a <= 0``
    (see :func:`exp_parts_float32`)."""
    s, s_lo, scale = exp_parts_float32(a, err)
    return s * scale, s_lo * scale


def exp_parts_float32(
    a: jax.Array, err: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(s, s_lo, scale)`` with ``(s + s_lo) * scale = exp(a)`` to about 2^-30 relative,
    for ``a <= 0``: ``s`` in ``[1/sqrt 2, sqrt 2]`` and ``scale`` a power of two (0 below
    float32's normal range). Kept apart, the low part is not flushed to zero where
    ``exp(a)`` nears the bottom of the normal range.

    XLA's exp is within an ulp; its rounding, through ``log1p``, was most of softplus's
    error and, through ``y``, of the derivative read from it. So exp is taken apart here
    as Cody and Waite do: ``a = k log(2) + r`` with ``|r| <= log(2) / 2`` (exact up to the
    rounding of ``r``), ``exp(r) = 1 + p`` with ``p = expm1(r)`` a polynomial, and
    ``1 + p`` split into a rounded sum and its exact error (Fast2Sum), both scaled by
    ``2^k``.

    ``err``, if given, is a small addition to ``a`` (the rounding of a shift, below an
    ulp of ``a``), taken into the reduced argument: ``exp(a + err)``. Scaling the result by
    ``1 + err`` instead would lose it near the bottom of the normal range, where the
    correction's product with the result is subnormal and flushed to zero.
    """
    # Below -88, exp(a) is under float32's smallest normal (XLA on CPU flushes it to 0
    # anyway); clamping keeps k in the range of a normal power of two.
    underflow = a < EXP_PAIR_FLOOR
    a = jnp.maximum(a, EXP_PAIR_FLOOR)
    k = jnp.floor(a * LOG2_E + 0.5)
    r = (a - k * LN2_HI16) - k * LN2_LO
    if err is not None:
        r = r + jnp.where(underflow, 0.0, err)
    p = r + r * (r * horner(EXPM1_QUOTIENT_FLOAT32, r))
    s = opaque_identity(1 + p)
    s_lo = lax.stop_gradient((1 - s) + p)
    # 2^k for integral k in [-127, 0], built from its bits (k = -127 gives 0).
    biased = lax.stop_gradient(k).astype(jnp.int32) + 127
    scale = lax.bitcast_convert_type(lax.shift_left(biased, jnp.int32(23)), jnp.float32)
    scale = jnp.where(underflow, 0.0, scale)
    return s, s_lo, scale


def log1p_unit(t: jax.Array) -> jax.Array:
    """``log1p(t)`` for ``t`` in ``[0, 1]``, as accurate as ``log``.

    Below a threshold, the series ``t + t^2 Q(t)``, ``Q(t) = -1/2 + t/3 - t^2/4 + ...``
    (degree 18, truncated below half an ulp: ``t < 0.14`` in float64). Above it,
    ``log(s) + (t - (s - 1)) / s`` with ``s = 1 + t`` rounded: the second term is the exact
    rounding error of ``s`` (Fast2Sum), identically zero as a function of ``t``, hence
    stop_gradient is exact.
    """
    nmant = jnp.finfo(t.dtype).nmant
    small = t < 2.0 ** (-(nmant + 2) / (LOG1P_SERIES_DEGREE + 1))
    ts = jnp.where(small, t, 0.0)
    q = jnp.zeros_like(ts)
    for k in range(LOG1P_SERIES_DEGREE, 1, -1):
        q = q * ts + (-1.0) ** (k + 1) / k
    series = ts + (ts * ts) * q
    s = 1 + t
    err = lax.stop_gradient(t - (opaque_identity(s) - 1))
    return jnp.where(small, series, jnp.log(s) + err / s)


def neg_expm1(v: jax.Array) -> jax.Array:
    """``-expm1(-v)`` for ``v >= 0``.

    Below log(2), where ``1 - exp(-v)`` cancels, the Taylor polynomial is more accurate
    than XLA's CPU expm1 (4.6 ULP) and cheaper; it is evaluated as ``v + v^2 P(v)``, so
    ``v`` passes through exactly and only the small correction is rounded. Above it,
    ``1 - exp(-v)`` loses nothing.
    """
    small = v < math.log(2.0)
    z = jnp.where(small, v, 0.0)
    coefficients = NEG_EXPM1_QUOTIENT[max(32, jnp.finfo(v.dtype).bits)]
    return jnp.where(small, z + z * (z * horner(coefficients, z)), 1 - jnp.exp(-v))
