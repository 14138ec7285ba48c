r"""softmax and masked_softmax: ``y_i = exp(x_i) / (exp(sink) + sum_j exp(x_j))``.

The public functions, then the primal (plain differentiable JAX, so that transforming the
forward rule differentiates exactly what is computed), the reverse-mode rule, the
forward-mode rule (for :func:`stablelayers.forward_mode`), and the CPU row kernels that
stand in for the primal and the reverse-mode rule on the CPU.
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stablelayers._core import checks
from stablelayers._core.arithmetic import (
    compute_dtype,
    exp_corrected,
    exp_share,
    reciprocal_of_pair,
)
from stablelayers._core.checks import Axes, Axis
from stablelayers._core.compensated_sum import add_pair, compensated_sum
from stablelayers._core.define_op import define_op
from stablelayers._core.nonfinite import nan_where
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers._core.row_shift import (
    exempt_from_nan,
    row_max,
    shift,
    shift_of_row_max,
    shifted_logits,
)
from stablelayers._cpu import calls, library

# (y, the sink's share per row or None, whether the row's largest share exceeds 1/2)
Residuals = tuple[jax.Array, jax.Array | None, jax.Array | None]


@allow_rank_promotion
def softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    initial: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax, exact in value and gradient, that never overflows or leaks a NaN.

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp(x_i)}{\sum_{j \in \text{row}} \exp(x_j)}

    computed as ``exp(x - max) / sum(exp(x - max))`` with the rounding of ``x - max``
    carried along (Knuth's TwoSum), so large logits lose no accuracy. The backward pass
    keeps only the output and applies ``y * (g - sum(g * y))``
    (Bridle, 1990; the Jacobian is ``diag(y) - y y^T`` per row).

    Args:
        x: logits of any shape. Integers are promoted to float; float16 and bfloat16 are
            computed in float32 and returned in their own dtype.
        axis: the axis, or tuple of axes, that forms a row; ``None`` for all axes.
        where: optional boolean mask broadcastable to ``x.shape``. ``False`` entries are
            left out: their output is exactly 0 and their gradient exactly 0, whatever
            value (even NaN or inf) sits there. A row with nothing unmasked is all 0.
        initial: accepted for compatibility with the old
            ``jax.nn.softmax(x, axis, where, initial)``: a lower bound on the shift. The shift
            changes nothing in exact arithmetic, so stablelayers always shifts by the row's
            own maximum; a large ``initial`` can never underflow a row to 0/0. Must be real
            and broadcast to one value per row.

    Returns:
        An array of ``x``'s shape and (float) dtype whose rows sum to one. Entries equal to
        ``-inf`` get 0; a row of only ``-inf`` is all 0 (as if masked), and a row holding
        ``+inf`` shares its mass equally among its ``+inf`` entries.

    Raises:
        TypeError: ``where`` is not boolean, or ``axis`` is not an int or tuple of ints.
        ValueError: ``where`` does not broadcast to ``x``, or ``axis`` is out of range.
    """
    x, axes, mask = checks.prepare_rows(x, axis, where, initial)
    return apply(x, mask, None, axes)


@allow_rank_promotion
def masked_softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    initial: ArrayLike | None = None,
    sink: ArrayLike | None = None,
) -> jax.Array:
    r"""The attention softmax: ``-inf`` logits count as masked, and an optional sink.

    .. math::
        y_i = \frac{\exp(x_i)}{\exp(\mathrm{sink}) + \sum_j \exp(x_j)}

    The sink is an extra logit per row that sits in the normaliser only, so a row may give
    less than all of its attention to the values: the learned attention sinks of gpt-oss
    (OpenAI, 2025; Xiao et al., 2023, "Efficient Streaming Language Models with Attention
    Sinks"). ``sink=0`` is "softmax1" (Miller, 2023, "Attention is off by one"). Its
    gradient is exact: ``d L / d sink = -p_sink * sum(g * y)`` with ``p_sink`` the sink's
    share of the row.

    Args:
        x: attention logits, e.g. of shape ``(batch, heads, q_len, kv_len)``.
        axis: the axis, or tuple of axes, to normalise over (the key axis); ``None`` for
            all axes.
        where: optional boolean mask broadcastable to ``x.shape``; ``False`` is masked.
        initial: as in :func:`softmax`: accepted, validated, and never allowed to change a
            row with an unmasked entry.
        sink: optional sink logit(s), broadcastable to ``x``'s shape without ``axis``, e.g.
            shape ``(heads, 1)`` for ``x`` of shape ``(batch, heads, q_len, kv_len)``.
            Differentiable.

    Returns:
        An array of ``x``'s shape and dtype. Masked entries and ``-inf`` logits are exactly
        0, and a row with nothing unmasked (all ``-inf`` included) is all 0 with gradient
        exactly 0, never NaN. Each row sums to ``1 - p_sink``.

    Raises:
        TypeError: ``where`` is not boolean.
        ValueError: ``where`` or ``sink`` does not broadcast, or ``axis`` is out of range.
    """
    x, axes, mask = checks.prepare_rows(x, axis, where, initial)
    return apply(x, mask, checks.check_sink(sink, x.shape, axes), axes)


def apply(
    x: jax.Array, where: jax.Array | None, sink: jax.Array | None, axis: Axes
) -> jax.Array:
    """The softmax of checked arguments (``checks.prepare_rows``, ``checks.check_sink``),
    with the rules the switches ask for."""
    if x.size == 0:
        return jnp.zeros_like(x)
    kernels = library.available()
    return softmax_op(x, where, sink, axis, kernels)


def _primal(
    x: jax.Array, where: jax.Array | None, sink: jax.Array | None, axis: Axes
) -> Residuals:
    """``(y, p_sink, dominant)``: the softmax in ``x.dtype``, the sink's share per row, and
    (without a sink) whether the row's largest entry has more than half the mass.

    Three passes over ``x`` and none over a temporary: the row max, the row total, and
    the output, which recomputes ``exp`` from ``x`` in registers rather than reading back
    what the total summed (XLA would otherwise write those terms to memory).
    """
    out_dtype = x.dtype
    dtype = compute_dtype(out_dtype)
    x = x.astype(dtype)
    sink = None if sink is None else sink.astype(dtype)
    amount, has_posinf = shift_of_row_max(row_max(x, where, sink, axis))
    d, err, d_sink, err_sink = shifted_logits(x, where, sink, axis, amount, has_posinf)
    # The total as a float pair: its rounding would otherwise be a relative error of every
    # output entry.
    total, total_lo = compensated_sum(exp_corrected(d, err), axis)
    e_sink = None
    if d_sink is not None and err_sink is not None:
        e_sink = exp_corrected(d_sink, err_sink)
        total, total_lo = add_pair(total, total_lo, e_sink)
    # An unmasked NaN makes the total NaN (row_shift.shift keeps it); nothing else can.
    nan = jnp.isnan(total)
    # A row with nothing unmasked has total == 0 and every e == 0: its result is 0.
    total = jnp.where(total == 0, 1.0, total)
    # e / total as e * (r + r_lo) with r + r_lo = 1 / (total + total_lo) to twice the
    # precision: the rounding of the reciprocal no longer adds to that of the product (XLA
    # computes a division by a row value as a multiplication by its reciprocal).
    r, r_lo = reciprocal_of_pair(total, total_lo)
    d, err, _ = shift(x, where, amount, has_posinf)
    y, e = exp_share(d, err, r, r_lo)
    # Masked places stay exactly 0 even when a NaN logit elsewhere makes the row's total NaN.
    y = jnp.where(e == 0, 0.0, y)
    nan = nan & ~exempt_from_nan(x, where)
    y = jnp.where(nan, nan_where(nan, y.dtype), y)
    p_sink = None if e_sink is None else e_sink * r
    # The largest entry of a row has e == 1, so its share is 1 / total.
    dominant = (total < 2) if sink is None else None
    return y.astype(out_dtype), p_sink, dominant


def _vjp(
    axis: Axes,
    y: jax.Array,
    p_sink: jax.Array | None,
    g: jax.Array,
    dominant: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    # J = diag(y) - y y^T (one block per row), so J^T g = y * (g - sum(g * y)). With a sink
    # the sink is one more entry of the row whose cotangent is 0, and
    # d y_i / d sink = -y_i * p_sink.
    #
    # The VJP is unchanged by adding a constant c to every cotangent of the (extended) row,
    # the sink's included, because the extended row sums to one. Subtracting c1 = sum(g * y)
    # first and then applying the rule to the centred cotangent removes the cancellation in
    # g_k - sum(g * y) at a dominant entry y_k ~ 1, which otherwise loses every digit.
    dtype = compute_dtype(y.dtype)
    y = y.astype(dtype)
    # Zero-probability entries (masked, or underflowed) take no part; this also keeps a
    # non-finite cotangent in a masked place out of the row sums.
    g = g.astype(dtype)
    dead = y == 0
    # Both row sums as compensated reductions: c1's rounding would otherwise be all that is
    # left of an entry where g_i - c1 cancels, and a plain sum makes XLA on the CPU write
    # the products to memory before reducing them. Each reads g and y itself, so that no
    # masked copy of g is written to memory for them to share.
    c1, c1_lo = compensated_sum(jnp.where(dead, 0.0, g * y), axis)
    centred = (g - c1) - c1_lo
    c2, c2_lo = compensated_sum(jnp.where(dead, 0.0, centred * y), axis)
    c2 = c2 + c2_lo
    if p_sink is not None:
        c2 = c2 - p_sink * c1
    elif dominant is not None:
        # c2 is c1's rounding error recovered through sum(y) == 1, which is what a dominant
        # entry needs; in a row without one, y's own rounding errors make c2 mostly noise,
        # so it is used only where the largest share exceeds one half.
        c2 = jnp.where(dominant, c2, 0.0)
    # Exactly zero where y is: a NaN row sum (from a NaN logit elsewhere in the row) must
    # not reach masked places either.
    grad_x = jnp.where(dead, 0.0, y * (centred - c2))
    grad_sink = None if p_sink is None else p_sink * (-c1 - c2)
    return grad_x, grad_sink


def _jvp(
    axis: Axes, y: jax.Array, p_sink: jax.Array | None, x_dot: jax.Array, sink_dot: jax.Array
) -> jax.Array:
    # The same J applied to a tangent: y * (x_dot - sum(y * x_dot) - p_sink * sink_dot).
    dtype = compute_dtype(y.dtype)
    y = y.astype(dtype)
    x_dot = jnp.where(y == 0, 0.0, x_dot.astype(dtype))
    mean = jnp.sum(y * x_dot, axis=axis, keepdims=True)
    if p_sink is not None:
        mean = mean + p_sink * sink_dot
    return jnp.where(y == 0, 0.0, y * (x_dot - mean))


# The CPU row kernels: one pass over x where XLA makes several, with the same semantics.
# Their derivatives are those of the pure-JAX code they stand in for.


def _rows_reference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _primal(x, None, None, (1,))[0], calls.no_tangent(x[:, 0])


def _grad_rows_reference(y: jax.Array, g: jax.Array) -> jax.Array:
    return _vjp((1,), y, None, g)[0]


_kernel = calls.differentiable_as(_rows_reference)(calls.softmax)
_grad_kernel = calls.differentiable_as(_grad_rows_reference)(calls.softmax_grad)


def _values(
    x: jax.Array, where: jax.Array | None, sink: jax.Array | None, axis: Axes, kernels: bool
) -> Residuals:
    """``_primal``, from the row kernel where it applies and the program runs on the CPU."""
    if where is not None or sink is not None or not calls.rows_apply(x, axis):
        return _primal(x, where, sink, axis)

    def kernel(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y, total = _kernel(calls.as_rows(x, axis))
        return y.reshape(x.shape).astype(x.dtype), calls.from_rows(total < 2, x, axis)

    def pure_jax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y, _, dominant = _primal(x, None, None, axis)
        return y, cast(jax.Array, dominant)

    y, dominant = calls.on_cpu(kernel, pure_jax, kernels, x)
    return y, None, dominant


def _grad(
    axis: Axes,
    kernels: bool,
    y: jax.Array,
    p_sink: jax.Array | None,
    g: jax.Array,
    dominant: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
    """``_vjp``, from the row kernel where it applies: the rule reads only y, so it serves
    masked rows too (their masked entries have y == 0), but not a sink."""
    if p_sink is not None or dominant is None or not calls.rows_apply(y, axis):
        return _vjp(axis, y, p_sink, g, dominant)

    def kernel(y: jax.Array, g: jax.Array, dominant: jax.Array) -> jax.Array:
        # The kernel finds the dominant rows itself (largest share above one half).
        return _grad_kernel(calls.as_rows(y, axis), calls.as_rows(g, axis)).reshape(y.shape)

    def pure_jax(y: jax.Array, g: jax.Array, dominant: jax.Array) -> jax.Array:
        return _vjp(axis, y, None, g, dominant)[0]

    return calls.on_cpu(kernel, pure_jax, kernels, y, g, dominant), None


def _op_primal(
    x: jax.Array, where: jax.Array | None, sink: jax.Array | None, axis: Axes, kernels: bool
) -> jax.Array:
    return _values(x, where, sink, axis, kernels)[0]


def _fwd(
    x: jax.Array, where: jax.Array | None, sink: jax.Array | None, axis: Axes, kernels: bool
) -> tuple[jax.Array, Residuals]:
    residuals = _values(x, where, sink, axis, kernels)
    y, _, _ = residuals
    return y, residuals


def _bwd(
    axis: Axes, kernels: bool, residuals: Residuals, g: jax.Array
) -> tuple[jax.Array, None, jax.Array | None]:
    y, p_sink, dominant = residuals
    grad_x, grad_sink = _grad(axis, kernels, y, p_sink, g, dominant)
    if grad_sink is not None and p_sink is not None:
        grad_sink = grad_sink.astype(p_sink.dtype)
    return grad_x.astype(y.dtype), None, grad_sink


def _jvp_rule(
    axis: Axes,
    kernels: bool,
    primals: tuple[jax.Array, jax.Array | None, jax.Array | None],
    tangents: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    x, where, sink = primals
    x_dot, _, sink_dot = tangents
    y, p_sink, _ = _values(x, where, sink, axis, kernels)
    return y, _jvp(axis, y, p_sink, x_dot, sink_dot).astype(y.dtype)


softmax_op = define_op(_op_primal, fwd=_fwd, bwd=_bwd, jvp=_jvp_rule, nondiff_argnums=(3, 4))
