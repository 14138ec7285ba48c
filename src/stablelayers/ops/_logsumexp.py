r"""logsumexp: ``log(sum_j b_j exp(x_j))`` over a row, on the shared core's shift.

The value is Blanchard, Higham & Higham's accurate form (2021, "Accurately computing the
log-sum-exp and softmax functions", IMA J. Numer. Anal. 41(4)):

.. math::
    \mathrm{lse}(x) = m + \mathrm{log1p}\Big(\sum_{j \ne k} e^{x_j - m}\Big),
    \qquad m = x_k = \max_j x_j,

so a row with one dominant entry keeps the tail that ``log(1 + tail)`` would round away.
Its derivative is the softmax, ``d lse / d x_j = b_j e^{x_j - lse}``, which the backward pass
rebuilds from ``x`` (the one array it keeps) and two numbers per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from stablelayers._core import arithmetic, checks, compensated_sum, row_shift
from stablelayers._core.checks import Axes, Axis
from stablelayers._core.define_op import define_op
from stablelayers._core.nonfinite import nan_where, neg_inf_where
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.ops._logsumexp_complex import complex_logsumexp

Maybe = jax.Array | None


def _live_mask(where: Maybe, b: Maybe) -> Maybe:
    # b_j == 0 takes entry j out of the sum, as in jax.nn.logsumexp (even if x_j is inf).
    if b is None:
        return where
    nonzero = b != 0
    return nonzero if where is None else where & nonzero


def _terms(x: jax.Array, where: Maybe, b: Maybe, top: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(e, dead)``: ``e_j = exp(x_j - shift)`` (TwoSum-corrected) with 0 at dead entries."""
    shift, has_posinf = row_shift.shift_of_row_max(top)
    d, err, dead = row_shift.shift(x, where, shift, has_posinf)
    return arithmetic.exp_corrected(d, err), dead


def row_log_total(
    x: jax.Array, where: Maybe, axis: Axes
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The unweighted row sum, shared with log_softmax: ``(top, total, total_lo,
    log_total)`` per row (keepdims) of ``x`` in the compute dtype, with ``top`` the row max,
    ``total + total_lo = sum_j exp(x_j - shift)`` over the live entries as a float pair (0
    for a row with none, NaN for a row with a live NaN) and ``log_total = log(total)``, so
    that ``lse = shift + log_total``. One pass over ``x`` after the max."""
    top = row_shift.row_max(x, where, None, axis)
    e, _ = _terms(x, where, None, top)
    # log(sum_j e_j) = log1p(sum_j e_j - 1) (Blanchard-Higham-Higham). A row with one
    # dominant entry has e == 1 there and a tiny rest, which float addition to 1 would lose
    # (jax.nn's log_softmax returns exactly 0.0 at the arg-max where the truth is -7.1e-12).
    # So the terms equal to 1 are counted apart and the rest summed as a float pair; from
    # two ones on, log(total) loses nothing and the low part is a first-order correction.
    ones, rest, rest_lo = compensated_sum.counted_sum(e, axis)
    total, total_lo = compensated_sum.add_pair(rest, rest_lo, ones)
    safe = jnp.where(total == 0, 1.0, total)
    log_total = jnp.where(
        ones == 1, jnp.log1p(rest) + rest_lo / (1 + rest), jnp.log(safe) + total_lo / safe
    )
    return top, total, total_lo, log_total


def _primal(
    x: jax.Array, where: Maybe, b: Maybe, axis: Axes, empty: float | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Return ``(lse, sign, top, total)`` per row (keepdims), in the compute dtype.

    ``total = sum_j b_j e_j``; ``lse = shift + log|total|``. A row with nothing live gets
    ``empty`` (``-inf`` for the public function, a finite value inside the losses, where the
    row is ignored and must not make an inf).
    """
    dtype = arithmetic.compute_dtype(x.dtype)
    x = x.astype(dtype)
    where = _live_mask(where, b)
    if b is None:
        top, total, _, log_total = row_log_total(x, where, axis)
        sign = jnp.where(total > 0, 1.0, 0.0).astype(dtype)
        # A live NaN makes the total NaN (row_shift.shift keeps it), and that NaN, the
        # input's own, is the result: no NaN constant (jax.debug_nans under disable_jit
        # checks every eager intermediate).
        nan = jnp.isnan(total)
        nan_of_row = total
    else:
        # A signed, weighted total has no dominant term of exactly 1 to split off.
        top = row_shift.row_max(x, where, None, axis)
        e, _ = _terms(x, where, b, top)
        total = jnp.sum(jnp.where(e == 0, 0.0, e * b.astype(dtype)), axis=axis, keepdims=True)
        sign = jnp.sign(total)
        log_total = jnp.log(jnp.where(total == 0, 1.0, jnp.abs(total)))
        live_nan = jnp.isnan(x) if where is None else jnp.isnan(x) & where
        nan_of_row = jnp.sum(jnp.where(live_nan, x, 0.0), axis=axis, keepdims=True)
        nan = row_shift.nan_rows(x, where, axis)
    shift, has_posinf = row_shift.shift_of_row_max(top)
    empty_row = total == 0
    lse = jnp.where(has_posinf, top, shift + log_total)
    fill = neg_inf_where(empty_row, lse.dtype) if empty is None else empty
    lse = jnp.where(empty_row, fill, lse)
    lse = jnp.where(nan, nan_of_row, lse)
    return lse, lax.stop_gradient(sign), top, jnp.where(empty_row, 1.0, total)


def _softmax_weights(
    x: jax.Array, where: Maybe, b: Maybe, top: jax.Array, total: jax.Array
) -> jax.Array:
    """``d lse / d b_j = e_j / total`` (0 at dead entries), rebuilt from ``x``."""
    # Recomputed from x in registers: shared with the forward pass's sum (the same
    # expression, under jit), the terms would be written to memory between the passes.
    x = arithmetic.opaque_identity(x.astype(arithmetic.compute_dtype(x.dtype)))
    e, dead = _terms(x, _live_mask(where, b), b, top)
    return jnp.where(dead | (e == 0), 0.0, e / total)


def _lse_value(
    x: jax.Array, where: Maybe, b: Maybe, axis: Axes, empty: float | None
) -> tuple[jax.Array, jax.Array]:
    """``(lse, sign)`` per row in keepdims shape, compute dtype."""
    lse, sign, _, _ = _primal(x, where, b, axis, empty)
    return lse, sign


def _lse_fwd(
    x: jax.Array, where: Maybe, b: Maybe, axis: Axes, empty: float | None
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array | None, ...]]:
    lse, sign, top, total = _primal(x, where, b, axis, empty)
    # Kept: x (an input), b (an input, when given) and two numbers per row.
    return (lse, sign), (x, where, b, top, total)


def _lse_bwd(
    axis: Axes,
    empty: float | None,
    residuals: tuple[jax.Array, Maybe, Maybe, jax.Array, jax.Array],
    cotangents: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, None, jax.Array | None]:
    # d lse / d x_j = b_j e_j / total and d lse / d b_j = e_j / total, with total the signed
    # sum (so |total| inside the log contributes the sign). The sign has no derivative.
    # Dead entries (masked, b == 0, or below a +inf) have e == 0: exactly zero gradient,
    # whatever the cotangent or the value there.
    x, where, b, top, total = residuals
    g_lse, _ = cotangents  # the sign has no derivative
    g = g_lse.astype(total.dtype)
    w = _softmax_weights(x, where, b, top, total)
    g = jnp.where(total == 0, 0.0, g)
    dx = g * (w if b is None else w * b.astype(w.dtype))
    dx = jnp.where(w == 0, 0.0, dx).astype(x.dtype)
    if b is None:
        return dx, None, None
    db = checks.sum_to_shape(jnp.where(w == 0, 0.0, g * w), b.shape)
    return dx, None, db.astype(b.dtype)


def _lse_jvp_rule(
    axis: Axes,
    empty: float | None,
    primals: tuple[jax.Array, Maybe, Maybe],
    tangents: tuple[jax.Array, Maybe, Maybe],
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    # The same weights applied to a tangent: lse_dot = sum(b w x_dot) + sum(w b_dot).
    x, where, b = primals
    x_dot, _, b_dot = tangents
    lse, sign, top, total = _primal(x, where, b, axis, empty)
    w = _softmax_weights(x, where, b, top, total)
    dtype = w.dtype
    x_dot = jnp.where(w == 0, 0.0, x_dot.astype(dtype))
    weighted = w if b is None else w * b.astype(dtype)
    lse_dot = jnp.sum(weighted * x_dot, axis=axis, keepdims=True)
    if b is not None and b_dot is not None:
        b_dot = jnp.where(w == 0, 0.0, jnp.broadcast_to(b_dot, w.shape).astype(dtype))
        lse_dot = lse_dot + jnp.sum(w * b_dot, axis=axis, keepdims=True)
    return (lse, sign), (lse_dot, jnp.zeros_like(sign))


# The op, traced with the rule the current mode asks for: ``lse_rows(x, where, b, axis,
# empty) -> (lse, sign)`` per row, keepdims, compute dtype. The losses and dense attention
# call it on checked arguments.
lse_rows = define_op(
    _lse_value, fwd=_lse_fwd, bwd=_lse_bwd, jvp=_lse_jvp_rule, nondiff_argnums=(3, 4)
)


@allow_rank_promotion
def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-sum-exp with ``jax.nn.logsumexp``'s signature, accurate and NaN-free.

    .. math::
        \mathrm{lse}(a) = \log \Big|\sum_j b_j e^{a_j}\Big|
        = m + \mathrm{log1p}\Big(\sum_{j \ne k} e^{a_j - m}\Big)

    with ``m = a_k`` the row max (Blanchard, Higham & Higham, 2021, "Accurately computing
    the log-sum-exp and softmax functions"): the arg-max's term is added by ``log1p``, so a
    dominant row keeps its tail. The shift's rounding is carried (TwoSum) as in
    :func:`softmax`. The gradient is the softmax, ``d lse / d a_j = b_j e^{a_j - lse}``
    (``e^{a_j - lse}`` for ``b``); the backward pass keeps ``a`` (and ``b``) and two numbers
    per row, and rebuilds it.

    Args:
        a: input of any shape (integers promoted; half precision computed in float32 and
            returned in its own dtype).
        axis: axis or tuple of axes to reduce; ``None`` (the default, as in JAX and SciPy)
            reduces every axis.
        b: optional weights, broadcast together with ``a`` (as ``jax.nn.logsumexp`` and
            SciPy do: ``a`` of shape ``(4,)`` and ``b`` of ``(3, 4)`` reduce a ``(3, 4)``
            array; ``axis`` counts in the broadcast shape), negative entries allowed.
            Entries with ``b == 0`` are left out, whatever ``a`` holds there. Differentiable.
        keepdims: keep the reduced axes as size 1.
        return_sign: return ``(log|sum|, sign(sum))``; otherwise a negative sum gives NaN.
        where: optional boolean mask broadcastable to ``a.shape``; ``False`` entries
            contribute exactly nothing, value or gradient, even if NaN or inf.

    Returns:
        The reduced array (and the sign, with ``return_sign``). A row with nothing to sum
        gives ``-inf`` (sign 0) with gradient exactly 0; a row holding ``+inf`` gives
        ``+inf``; a NaN in a live place gives NaN.

    Raises:
        TypeError: ``where`` is not boolean, or ``axis`` is not an int or tuple of ints.
        ValueError: ``where`` or ``b`` does not broadcast to ``a``, or ``axis`` is out of
            range.
    """
    if jnp.iscomplexobj(a) or (b is not None and jnp.iscomplexobj(b)):
        return _complex(a, axis, b, keepdims, return_sign, where)
    x = checks.as_float_array(a, "a")
    b_ = None
    if b is not None:
        b_ = checks.as_float_array(b, "b")
        shape = _broadcast_shape(x.shape, b_.shape)
        # As jax.nn.logsumexp and scipy: a and b broadcast together, then the reduction.
        # Explicit, so it holds under jax_numpy_rank_promotion="raise".
        x = jnp.broadcast_to(x, shape)
    axes = checks.canonical_axis(axis, x.ndim)
    where_ = checks.check_where(where, x.shape)
    if x.size == 0:
        lse = jnp.full(checks.reduced_shape(x.shape, axes), -jnp.inf, x.dtype)
        sign = jnp.zeros_like(lse)
    else:
        lse, sign = lse_rows(x, where_, b_, axes, None)
        if b_ is not None and not return_sign:
            # NaN only where the sum is negative: no NaN constant (see _nonfinite).
            negative = sign < 0
            lse = jnp.where(negative, nan_where(negative, lse.dtype), lse)
        lse, sign = lse.astype(x.dtype), sign.astype(x.dtype)
    if not keepdims:
        lse, sign = jnp.squeeze(lse, axes), jnp.squeeze(sign, axes)
    return (lse, sign) if return_sign else lse


def _complex(
    a: ArrayLike,
    axis: Axis,
    b: ArrayLike | None,
    keepdims: bool,
    return_sign: bool,
    where: ArrayLike | None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    x = jnp.asarray(a)
    b_ = None if b is None else jnp.asarray(b)
    dtype = jnp.result_type(x, jnp.complex64) if b_ is None else jnp.result_type(x, b_, 1j)
    shape = x.shape if b_ is None else _broadcast_shape(x.shape, b_.shape)
    x = jnp.broadcast_to(x.astype(dtype), shape)
    b_ = None if b_ is None else jnp.broadcast_to(b_, shape)
    axes = checks.canonical_axis(axis, x.ndim)
    where_ = checks.check_where(where, x.shape)
    lse, sign = complex_logsumexp(x, axes, b_, where_, return_sign)
    if not keepdims:
        lse, sign = jnp.squeeze(lse, axes), jnp.squeeze(sign, axes)
    return (lse, sign) if return_sign else lse


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    try:
        return tuple(jnp.broadcast_shapes(a, b))
    except ValueError:
        raise ValueError(
            f"`b` of shape {b} does not broadcast with the input's shape {a}."
        ) from None
