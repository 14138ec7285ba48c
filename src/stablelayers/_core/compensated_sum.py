r"""Row sums to twice the working precision, in one pass over memory.

``compensated_sum`` reduces ``(value, error)`` pairs with Knuth's TwoSum as the reduction
operator: combining ``(a, e_a)`` and ``(b, e_b)`` gives ``s = fl(a + b)`` and
``e_a + e_b + (a + b - s)``, the last term exact. Whatever order or tree the compiler picks
for the reduction, the rounding of every addition is kept in the error part, so
``hi + lo`` is the sum with an error of order ``n u^2`` relative to the sum of magnitudes
rather than ``n u`` (Ogita, Rump & Oishi, 2005, "Accurate sum and dot product", SIAM J.
Sci. Comput. 26(6), Algorithm 4.4; cascaded summation).

It is one variadic XLA ``reduce``: the compiler fuses the producer of ``x`` into it on every
backend, where a plain ``jnp.sum`` is split on the CPU into a tree of ``reduce-window``
passes that write the producer's output to memory first. Mathematically it is
``jnp.sum``, so that is its derivative: the error part is identically zero as a function
of ``x`` (as :func:`~stablelayers._core.arithmetic.two_sum_error` is).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.checks import Axes

Pair = tuple[jax.Array, jax.Array]


def _add_pairs(a: Pair, b: Pair) -> Pair:
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    total = a_hi + b_hi
    b_virtual = total - a_hi
    rounding = (a_hi - (total - b_virtual)) + (b_hi - b_virtual)
    return total, rounding + (a_lo + b_lo)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _pair_sum(x: jax.Array, axis: Axes) -> Pair:
    zero = jnp.zeros((), x.dtype)
    hi, lo = lax.reduce((x, jnp.zeros_like(x)), (zero, zero), _add_pairs, axis)
    # An infinite or NaN sum has no meaningful error part (inf - inf is NaN there).
    return hi, jnp.where(jnp.isfinite(hi), lo, 0.0)


def _pair_sum_jvp(
    axis: Axes, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[Pair, Pair]:
    # d(hi + lo) = sum(x_dot); the error part lo is identically zero as a function of x.
    (x,), (x_dot,) = primals, tangents
    hi, lo = _pair_sum(x, axis)
    return (hi, lo), (jnp.sum(x_dot, axis=axis), jnp.zeros_like(lo))


_pair_sum.defjvp(_pair_sum_jvp)


def compensated_sum(x: jax.Array, axis: Axes) -> Pair:
    """``(hi, lo)`` per row (keepdims shape of a reduction of ``x`` over ``axis``), with
    ``hi = fl(sum x)`` up to the order of summation and ``hi + lo`` the sum to about twice
    the precision of ``x.dtype``; ``lo`` is 0 where ``hi`` is not finite.

    Args:
        x: any float array.
        axis: a sorted tuple of non-negative axes of ``x``.
    """
    hi, lo = _pair_sum(x, tuple(axis))
    kept = tuple(1 if i in axis else n for i, n in enumerate(x.shape))
    return hi.reshape(kept), lo.reshape(kept)


def add_pair(hi: jax.Array, lo: jax.Array, b: jax.Array) -> Pair:
    """``(hi, lo) + b`` as a float pair (``b`` with no error part of its own)."""
    total = hi + b
    _, rounding = _add_pairs((lax.stop_gradient(hi), lo), (lax.stop_gradient(b), 0 * lo))
    # The rounding is identically zero as a function of hi and b (TwoSum's error term).
    return total, jnp.where(jnp.isfinite(total), lax.stop_gradient(rounding), 0.0)


def _add_counted(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    (a_ones, a_hi, a_lo), (b_ones, b_hi, b_lo) = a, b
    return (a_ones + b_ones, *_add_pairs((a_hi, a_lo), (b_hi, b_lo)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _counted_sum(e: jax.Array, axis: Axes) -> tuple[jax.Array, jax.Array, jax.Array]:
    ones = jnp.floor(e)
    zero = jnp.zeros((), e.dtype)
    operands = (ones, e - ones, jnp.zeros_like(e))
    count, rest, rest_lo = lax.reduce(operands, (zero, zero, zero), _add_counted, axis)
    return count, rest, jnp.where(jnp.isfinite(rest), rest_lo, 0.0)


Triple = tuple[jax.Array, jax.Array, jax.Array]


def _counted_sum_jvp(
    axis: Axes, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[Triple, Triple]:
    # floor has derivative 0, so the count is constant and the rest carries sum(e_dot).
    (e,), (e_dot,) = primals, tangents
    count, rest, rest_lo = _counted_sum(e, axis)
    zero = jnp.zeros_like(count)
    return (count, rest, rest_lo), (zero, jnp.sum(e_dot, axis=axis), zero)


_counted_sum.defjvp(_counted_sum_jvp)


def counted_sum(e: jax.Array, axis: Axes) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ones, rest, rest_lo)`` per row (keepdims) for terms ``0 <= e <= 1``: how many
    terms equal 1, and the sum of the others as a compensated float pair.

    The terms of a shifted softmax row are ``exp(x - max) <= 1``, with 1 at the max. A row
    with one dominant entry has its information in the tail ``rest``, which a pair summed
    as ``1 + rest`` keeps only to the absolute precision of 1: far too coarse for a tail of
    ``1e-12`` (the log-softmax of the arg-max is ``-log1p(rest)``). Counting the ones apart,
    as the CPU kernels do, keeps ``rest`` to its own relative precision. One pass over
    ``e``, like :func:`compensated_sum`.
    """
    ones, rest, rest_lo = _counted_sum(e, tuple(axis))
    kept = tuple(1 if i in axis else n for i, n in enumerate(e.shape))
    return ones.reshape(kept), rest.reshape(kept), rest_lo.reshape(kept)
