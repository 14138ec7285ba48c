r"""log_softmax: ``y_i = x_i - log(sum_j exp(x_j))``.

The public function, then the primal (plain differentiable JAX), the reverse-mode rules
(one from the output ``y``, used with a mask; one from the input ``x``, without), the
forward-mode rule (for :func:`stablelayers.forward_mode`), and the CPU row kernels that
stand in for the primal and the input-based rule on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stablelayers._core import checks
from stablelayers._core.arithmetic import (
    compute_dtype,
    exp_share,
    opaque_identity,
    reciprocal_of_pair,
)
from stablelayers._core.checks import Axes, Axis
from stablelayers._core.compensated_sum import compensated_sum
from stablelayers._core.define_op import define_op
from stablelayers._core.nonfinite import is_neginf, nan_where, neg_inf_where
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers._core.row_shift import (
    exempt_from_nan,
    shift,
    shift_of_row_max,
)
from stablelayers._cpu import calls, library
from stablelayers.ops._logsumexp import row_log_total

# Per row, what the backward pass reads besides x: (max, total, total_lo), the total as a
# float pair, from the pure-JAX code; (shift, rest, unused), the log-sum-exp as a float
# pair, from the row kernel.
RowStats = tuple[jax.Array, jax.Array, jax.Array]
# (y, None, None) with a mask; (None, x, stats) without one.
Residuals = tuple[jax.Array | None, jax.Array | None, RowStats | None]


@allow_rank_promotion
def log_softmax(
    x: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    initial: ArrayLike | None = None,
) -> jax.Array:
    r"""Log-softmax, accurate even at the arg-max of a row with one dominant entry.

    .. math::
        \mathrm{log\_softmax}(x)_i = x_i - \log \sum_j \exp(x_j)
        = (x_i - m) - \mathrm{log1p}\Big(\sum_j e^{x_j - m} - 1\Big)

    with ``m`` the row max; the ``- 1`` is taken exactly at the max entry, so a confident
    prediction gets ``-7.1e-12`` rather than ``0.0``. The backward pass applies
    ``g - softmax(x) * sum(g)``, keeping one array the size of ``x``: ``x`` itself, with
    the row max and total, from which it rebuilds the softmax as the forward pass did; or,
    with a mask, the output ``y`` (``softmax = exp(y)``).

    Args:
        x: logits of any shape (integers promoted; half precision computed in float32).
        axis: the axis, or tuple of axes, that forms a row; ``None`` for all axes.
        where: optional boolean mask broadcastable to ``x.shape``. Masked entries are
            ``-inf`` with gradient 0; a row with nothing unmasked is all ``-inf``.
        initial: as in :func:`softmax`.

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        TypeError: ``where`` is not boolean.
        ValueError: ``where`` does not broadcast to ``x``, or ``axis`` is out of range.
    """
    x, axes, mask = checks.prepare_rows(x, axis, where, initial)
    if x.size == 0:
        return jnp.zeros_like(x)
    kernels = library.available()
    return log_softmax_op(x, mask, axes, kernels)


def _primal(x: jax.Array, where: jax.Array | None, axis: Axes) -> tuple[jax.Array, RowStats]:
    """``(y, (max, total, total_lo))``: the log-softmax in ``x.dtype``, and per row the max
    and the total ``sum(exp(x - shift))`` as a float pair.

    Three passes over ``x``: the row max, the total, and the output, which recomputes its
    per-entry work from ``x`` in registers.
    """
    out_dtype = x.dtype
    x = x.astype(compute_dtype(out_dtype))
    # lse is the log-sum-exp less the shift, in the accurate log1p form.
    top, total, total_lo, lse = row_log_total(x, where, axis)
    amount, has_posinf = shift_of_row_max(top)
    # An unmasked NaN makes the total NaN (row_shift.shift keeps it); nothing else can.
    nan = jnp.isnan(total)
    # A row with nothing unmasked has total == 0; it has no live entry to use the total.
    total = jnp.where(total == 0, 1.0, total)
    # The output pass recomputes its per-entry work from x in registers instead of sharing
    # it with the reduction, which would make XLA write it to memory.
    d, err, dead = shift(opaque_identity(x), where, amount, has_posinf)
    no_mass = dead | is_neginf(d)
    y = jnp.where(no_mass, neg_inf_where(no_mass, d.dtype), (d - lse) + err)
    nan = nan & ~exempt_from_nan(x, where)
    y = jnp.where(nan, nan_where(nan, y.dtype), y)
    return y.astype(out_dtype), (top, total, total_lo)


def _vjp_from_output(axis: Axes, y: jax.Array, g: jax.Array) -> jax.Array:
    # d y_i / d x_j = delta_ij - softmax_j, so the VJP is g - exp(y) * sum(g). Entries at
    # -inf (masked, or a row with nothing unmasked) are constants: they neither take nor give
    # gradient.
    dtype = compute_dtype(y.dtype)
    y = y.astype(dtype)
    live = ~is_neginf(y)
    g = jnp.where(live, g.astype(dtype), 0.0)
    total = jnp.sum(g, axis=axis, keepdims=True)
    return jnp.where(live, g - jnp.exp(y) * total, 0.0)


def _vjp_from_input(axis: Axes, x: jax.Array, stats: RowStats, g: jax.Array) -> jax.Array:
    # The same g - softmax(x) * sum(g), with softmax(x) = exp(x - shift) / total rebuilt
    # from x the way the forward pass built it (the shift's rounding carried by TwoSum).
    # exp(y) would be worse: y = (x - shift) - lse is larger in magnitude than x - shift,
    # so its rounding is a larger absolute error in the exponent. Where g_i - p_i sum(g)
    # cancels, what is left is the rounding of p_i and of sum(g): so p_i is formed from an
    # exp and a reciprocal good to twice the precision, and sum(g) kept as a float pair.
    top, total, total_lo = stats
    x = x.astype(compute_dtype(x.dtype))
    d, err, dead = shift(x, None, *shift_of_row_max(top))
    live = ~dead & ~is_neginf(d)
    g = g.astype(x.dtype)
    g_total, g_total_lo = compensated_sum(jnp.where(live, g, 0.0), axis)
    p, _ = exp_share(d, err, *reciprocal_of_pair(total, total_lo))
    dx = jnp.where(live, (g - p * g_total) - p * g_total_lo, 0.0)
    # A NaN row has a NaN total (see _primal): NaN at every entry but its -inf ones.
    nan = jnp.isnan(total) & ~is_neginf(x)
    return jnp.where(nan, nan_where(nan, dx.dtype), dx)


def _jvp(axis: Axes, y: jax.Array, x_dot: jax.Array) -> jax.Array:
    dtype = compute_dtype(y.dtype)
    y = y.astype(dtype)
    live = ~is_neginf(y)
    x_dot = jnp.where(live, x_dot.astype(dtype), 0.0)
    mean = jnp.sum(jnp.exp(y) * x_dot, axis=axis, keepdims=True)
    return jnp.where(live, x_dot - mean, 0.0)


# The CPU row kernels: one pass over x where XLA makes several, with the same semantics.
# Their derivatives are those of the pure-JAX code they stand in for.


def _rows_reference(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    no_tangent = calls.no_tangent(x[:, 0])
    return _primal(x, None, (1,))[0], no_tangent, no_tangent


def _grad_rows_reference(
    x: jax.Array, shift: jax.Array, rest: jax.Array, g: jax.Array
) -> jax.Array:
    # shift and rest are functions of x; the derivative goes through x alone.
    return _vjp_from_input((1,), x, _primal(x, None, (1,))[1], g)


_kernel = calls.differentiable_as(_rows_reference)(calls.log_softmax)
_grad_kernel = calls.differentiable_as(_grad_rows_reference)(calls.log_softmax_grad)


def _kernels_take(x: jax.Array, where: jax.Array | None, axis: Axes, kernels: bool) -> bool:
    """Whether the row kernels make the forward pass, and so the stats its backward reads."""
    return kernels and where is None and calls.rows_apply(x, axis)


def _values(
    x: jax.Array, where: jax.Array | None, axis: Axes, kernels: bool
) -> tuple[jax.Array, RowStats]:
    """``_primal``, from the row kernel where it applies and the program runs on the CPU."""
    if not _kernels_take(x, where, axis, kernels):
        return _primal(x, where, axis)

    def kernel(x: jax.Array) -> tuple[jax.Array, RowStats]:
        y, amount, rest = _kernel(calls.as_rows(x, axis))
        rest = calls.from_rows(rest, x, axis)
        stats = (calls.from_rows(amount, x, axis), rest, jnp.zeros_like(rest))
        return y.reshape(x.shape).astype(x.dtype), stats

    return calls.on_cpu(kernel, lambda x: _primal(x, None, axis), kernels, x)


def _grad_from_input(
    axis: Axes, kernels: bool, x: jax.Array, stats: RowStats, g: jax.Array
) -> jax.Array:
    """``_vjp_from_input``, from the row kernel where the forward pass used it."""
    if not _kernels_take(x, None, axis, kernels):
        return _vjp_from_input(axis, x, stats, g)

    def kernel(
        x: jax.Array, amount: jax.Array, rest: jax.Array, unused: jax.Array, g: jax.Array
    ) -> jax.Array:
        per_row = (amount.reshape(-1), rest.reshape(-1))
        dx = _grad_kernel(calls.as_rows(x, axis), *per_row, calls.as_rows(g, axis))
        return dx.reshape(x.shape)

    def pure_jax(
        x: jax.Array, top: jax.Array, total: jax.Array, total_lo: jax.Array, g: jax.Array
    ) -> jax.Array:
        return _vjp_from_input(axis, x, (top, total, total_lo), g)

    return calls.on_cpu(kernel, pure_jax, kernels, x, *stats, g)


def _op_primal(x: jax.Array, where: jax.Array | None, axis: Axes, kernels: bool) -> jax.Array:
    return _values(x, where, axis, kernels)[0]


def _fwd(
    x: jax.Array, where: jax.Array | None, axis: Axes, kernels: bool
) -> tuple[jax.Array, Residuals]:
    y, stats = _values(x, where, axis, kernels)
    # Without a mask the backward pass keeps x, three numbers per row and nothing else; with
    # one it keeps y, whose -inf entries mark the masked places (keeping x would mean
    # keeping the mask too).
    if where is None:
        return y, (None, x, stats)
    return y, (y, None, None)


def _bwd(
    axis: Axes, kernels: bool, residuals: Residuals, g: jax.Array
) -> tuple[jax.Array, None]:
    y, x, stats = residuals
    if x is not None and stats is not None:
        return _grad_from_input(axis, kernels, x, stats, g).astype(x.dtype), None
    assert y is not None
    return _vjp_from_output(axis, y, g).astype(y.dtype), None


def _jvp_rule(
    axis: Axes,
    kernels: bool,
    primals: tuple[jax.Array, jax.Array | None],
    tangents: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    x, where = primals
    x_dot, _ = tangents
    y = _values(x, where, axis, kernels)[0]
    return y, _jvp(axis, y, x_dot).astype(y.dtype)


log_softmax_op = define_op(
    _op_primal, fwd=_fwd, bwd=_bwd, jvp=_jvp_rule, nondiff_argnums=(2, 3)
)
