"""The shared numerical core: every op's primal, forward rule and backward rule.

Each op is written three times, next to each other:

* ``_<op>_primal`` computes the value and what the backward pass needs. It is plain,
  differentiable JAX, so transforming the forward rule (``jax.hessian``, grad-of-grad)
  differentiates exactly the function being computed.
* ``_<op>_vjp`` is the reverse-mode rule. It reads only the op's output (one array the size
  of ``x``) and small per-row values.
* ``_<op>_jvp`` is the same derivative written as a tangent map, used only under
  :func:`stablelayers.forward_mode`, because JAX cannot run ``jax.jvp`` through a
  ``custom_vjp``.

On the CPU, softmax and log_softmax over trailing axes without a mask or sink run the row
kernels of ``_cpu_kernels.cc`` instead (one pass over ``x`` where XLA makes several), with the
same semantics; their derivatives are those of the pure-JAX code they stand in for.

Arguments reaching this module are already validated by ``_checks``: ``axis`` is a sorted
tuple of non-negative ints, ``where`` is a boolean array or ``None``, ``sink`` is ``None`` or
has the keepdims shape of a reduction over ``axis``.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers import _cpu_calls, _cpu_library
from stablelayers._rank_promotion import allow_rank_promotion


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float16 and bfloat16 are computed in float32; other float types as themselves."""
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def _two_sum_error(a: jax.Array, b: jax.Array, total: jax.Array) -> jax.Array:
    # Knuth's TwoSum: the exact rounding error of ``total = a + b``. ``x - max`` is the one
    # rounding that exp amplifies (an absolute error e in the exponent is a relative error e
    # in the result, up to 50 ULP for logits of size 1e4), so it is carried to the end.
    # The error is identically zero as a function, hence stop_gradient is exact.
    b_virtual = total - a
    err = (a - (total - b_virtual)) + (b - b_virtual)
    return lax.stop_gradient(jnp.where(jnp.isfinite(total), err, 0))


def _row_max(x, where, sink, axis):
    """The row max over unmasked entries (and the sink), under stop_gradient.

    Masked entries count as the lowest finite float rather than ``-inf``, so nothing here
    is infinite unless the input is (``jax.debug_infs`` checks every intermediate in eager
    mode); a row with nothing unmasked gets that finite max, and no entry of it has mass.
    """
    if where is not None:
        x = jnp.where(where, x, jnp.finfo(x.dtype).min)
    top = jnp.max(x, axis=axis, keepdims=True)
    if sink is not None:
        top = jnp.maximum(top, sink)
    return lax.stop_gradient(top)


def _shift_of_row_max(top):
    """Return ``(shift, has_posinf)``: the row max, or 0 where it is not finite, and
    whether it is ``+inf``."""
    return jnp.where(jnp.isfinite(top), top, 0.0), top == jnp.inf


def _row_shift(x, where, sink, axis):
    """Return ``(shift, has_posinf)`` per row (see ``_shift_of_row_max``)."""
    return _shift_of_row_max(_row_max(x, where, sink, axis))


def _shift(x, where, shift, has_posinf):
    """Return ``(d, err, dead)`` with ``x - shift = d + err`` exactly at live entries.

    ``dead`` marks the entries without mass: masked ones, and in a row holding ``+inf``
    every entry below it (the row is replaced by its limit: its ``+inf`` entries share the
    mass equally). A dead entry gets the lowest finite ``d``, whose exp is 0, rather than
    ``-inf``, so nothing inside is infinite unless the input is; whatever it held (NaN
    included) is gone.
    """
    dead = has_posinf & (x != jnp.inf)
    if where is not None:
        dead = dead | ~where
    x = jnp.where(dead | has_posinf, 0.0, x)
    raw = x - shift
    err = _two_sum_error(x, -shift, raw)
    # A finite logit stays finite after the shift (x - shift may overflow for logits near
    # the float limits), so it keeps its log-probability gradient; a -inf logit has none.
    lowest = jnp.finfo(x.dtype).min
    d = jnp.where(x == -jnp.inf, -jnp.inf, jnp.maximum(raw, lowest))
    return jnp.where(dead, lowest, d), err, dead


def _nan_rows(x, where, axis):
    """Whether each row holds a NaN in an unmasked place. Such a row is NaN at every
    unmasked entry but its ``-inf`` ones, on both CPU paths and whatever the row length
    (XLA's max may drop a NaN, so the rule is applied, not left to the arithmetic)."""
    nan = jnp.isnan(x)
    if where is not None:
        nan = nan & where
    return jnp.any(nan, axis=axis, keepdims=True)


def _exempt_from_nan(x, where):
    """The entries a NaN row leaves alone: masked ones and ``-inf`` logits."""
    exempt = x == -jnp.inf
    return exempt if where is None else exempt | ~where


def _shifted_logits(x, where, sink, axis):
    """Return ``(d, err, d_sink, err_sink)`` with ``x - shift = d + err`` exactly.

    The shift is the row max over unmasked entries (and the sink). Masked entries become
    ``-inf``. A row holding ``+inf`` is replaced by its limit: its ``+inf`` entries share the
    mass equally. A row with nothing unmasked is not shifted; its result is zero anyway.
    """
    shift, has_posinf = _row_shift(x, where, sink, axis)
    d, err, _ = _shift(x, where, shift, has_posinf)
    if sink is None:
        return d, err, None, None
    sink_dead = has_posinf & (sink != jnp.inf)
    sink = jnp.where(has_posinf, 0.0, sink)
    d_sink = sink - shift
    err_sink = _two_sum_error(sink, -shift, d_sink)
    return d, err, jnp.where(sink_dead, jnp.finfo(d.dtype).min, d_sink), err_sink


def _recomputed(x):
    # The identity (reduce_precision to x's own format), as a value XLA cannot merge with x.
    # The output pass then recomputes its per-entry work from x in registers instead of
    # sharing it with the reductions, which would make XLA write it to memory.
    return lax.reduce_precision(x, *_format_bits(x.dtype))


def _exp_corrected(d, err):
    # exp(d + err) = exp(d) * (1 + err) to first order (|err| <= ulp(d) / 2). Scaling by
    # (1 + err) rather than adding exp(d) * err keeps the correction for results near the
    # bottom of the normal range, where the product exp(d) * err would flush to zero.
    return jnp.exp(d) * (1 + err)


def _veltkamp_split(a):
    # a = hi + lo exactly, each with at most half of the format's significand bits, so that
    # products of halves are exact (Dekker, 1971).
    c = (2.0 ** ((jnp.finfo(a.dtype).nmant + 2) // 2) + 1) * a
    hi = c - (c - a)
    return hi, a - hi


def _reciprocal_pair(t):
    """``(r, r_lo)`` with ``r + r_lo = 1 / t`` to about twice the working precision.

    ``r = 1 / t`` rounded, and ``r_lo = (1 - t * r) / t``, where ``1 - t * r`` is exact:
    Dekker's product gives ``t * r`` as ``p + p_err`` exactly, and ``1 - p`` is exact
    (Sterbenz) since ``p`` is within an ulp of 1. Used on row totals only, so it costs
    nothing per entry; multiplying an entry by ``r`` alone would add the rounding of ``r``
    to the rounding of the product (XLA turns ``e / total`` into ``e * (1 / total)``).
    """
    r = 1 / t
    p = t * r
    t_hi, t_lo = _veltkamp_split(t)
    r_hi, r_lo = _veltkamp_split(r)
    p_err = ((t_hi * r_hi - p) + t_hi * r_lo + t_lo * r_hi) + t_lo * r_lo
    return r, lax.stop_gradient(((1 - p) - p_err) * r)


# --------------------------------------------------------------------------------------
# The CPU row kernels: where they apply, and their derivatives
# --------------------------------------------------------------------------------------


def _kernels_take(x):
    """Whether the CPU kernels can take ``x``'s entries: float32 work (half precision
    included), and at least one entry."""
    return compute_dtype(x.dtype) == jnp.float32 and x.size > 0


def _kernels_apply(x, axis):
    """Whether the row kernels can take ``x``: entries they take (``_kernels_take``) over
    trailing axes, so that each row is contiguous."""
    trailing = axis == tuple(range(x.ndim - len(axis), x.ndim))
    return _kernels_take(x) and trailing


def _as_rows(a, axis):
    """``a`` as a float32 ``(rows, n)`` array, each row one softmax row (axes trailing)."""
    n = math.prod(a.shape[i] for i in axis)
    return a.astype(jnp.float32).reshape(-1, n)


def _from_rows(rows, like, axis):
    """Per-row values ``(rows,)`` in the keepdims shape of a reduction of ``like``."""
    return rows.reshape(tuple(1 if i in axis else n for i, n in enumerate(like.shape)))


def _with_derivative_of(reference, static_trailing=0):
    """Make a kernel call differentiable to any order: its derivative is ``reference``'s,
    the pure-JAX function it stands in for (same arguments, same output structure). The
    last ``static_trailing`` arguments are constants (a Python ``beta``): both functions
    get them as they are, and they have no derivative."""

    def wrap(kernel):
        count = len(inspect.signature(kernel).parameters)
        static = tuple(range(count - static_trailing, count))
        op = jax.custom_jvp(kernel, nondiff_argnums=static)

        @op.defjvp
        @allow_rank_promotion
        def rule(*args):
            *constants, primals, tangents = args

            def differentiable(*primals):
                return reference(*primals, *constants)

            return op(*primals, *constants), jax.jvp(differentiable, primals, tangents)[1]

        return op

    return wrap


def _no_tangent(a):
    # A per-row value the backward kernel reads, whose derivative it takes through x.
    return lax.stop_gradient(jnp.zeros_like(a))


def _softmax_reference(x):
    return _softmax_primal(x, None, None, (1,))[0], _no_tangent(x[:, 0])


@_with_derivative_of(_softmax_reference)
def _softmax_rows(x):
    return _cpu_calls.softmax(x)


def _softmax_grad_reference(y, g):
    return _softmax_vjp((1,), y, None, g)[0]


@_with_derivative_of(_softmax_grad_reference)
def _softmax_grad_rows(y, g):
    return _cpu_calls.softmax_grad(y, g)


def _log_softmax_reference(x):
    return _log_softmax_primal(x, None, (1,))[0], _no_tangent(x[:, 0]), _no_tangent(x[:, 0])


@_with_derivative_of(_log_softmax_reference)
def _log_softmax_rows(x):
    return _cpu_calls.log_softmax(x)


def _log_softmax_grad_reference(x, shift, rest, g):
    # shift and rest are functions of x; the derivative goes through x alone.
    rows = _log_softmax_primal(x, None, (1,))[1]
    return _log_softmax_vjp_from_input((1,), x, rows, g)


@_with_derivative_of(_log_softmax_grad_reference)
def _log_softmax_grad_rows(x, shift, rest, g):
    return _cpu_calls.log_softmax_grad(x, shift, rest, g)


# --------------------------------------------------------------------------------------
# softmax and masked_softmax:  y_i = exp(x_i) / (exp(sink) + sum_j exp(x_j))
# --------------------------------------------------------------------------------------


def _softmax_primal(x, where, sink, axis):
    """Return ``(y, p_sink, dominant)``: the softmax in ``x.dtype``, the sink's share per
    row, and (without a sink) whether the row's largest entry has more than half the mass.
    """
    out_dtype = x.dtype
    dtype = compute_dtype(out_dtype)
    x = x.astype(dtype)
    sink = None if sink is None else sink.astype(dtype)
    d, err, d_sink, err_sink = _shifted_logits(x, where, sink, axis)
    e = _exp_corrected(d, err)
    total = jnp.sum(e, axis=axis, keepdims=True)
    e_sink = None
    if sink is not None:
        e_sink = _exp_corrected(d_sink, err_sink)
        total = total + e_sink
    # A row with nothing unmasked has total == 0 and every e == 0: its result is 0.
    total = jnp.where(total == 0, 1.0, total)
    # e / total as e * r + e * r_lo with r + r_lo = 1 / total to twice the precision: the
    # rounding of the reciprocal no longer adds to that of the product (XLA computes a
    # division by a row value as a multiplication by its reciprocal). 4.09 -> 3.75 ULP
    # worst on the hard inputs. reduce_precision to the same format is the identity; it
    # keeps XLA from refactoring the sum into e * (r + r_lo), where r_lo would round away.
    r, r_lo = _reciprocal_pair(total)
    y = e * r + lax.reduce_precision(e * r_lo, *_format_bits(dtype))
    # Masked places stay exactly 0 even when a NaN logit elsewhere makes the row's total NaN.
    y = jnp.where(e == 0, 0.0, y)
    y = jnp.where(_nan_rows(x, where, axis) & ~_exempt_from_nan(x, where), jnp.nan, y)
    y = y.astype(out_dtype)
    p_sink = None if sink is None else e_sink / total
    # The largest entry of a row has e == 1, so its share is 1 / total.
    dominant = (total < 2) if sink is None else None
    return y, p_sink, dominant


def _softmax_vjp(axis, y, p_sink, g, dominant=None):
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
    g = jnp.where(y == 0, 0.0, g.astype(dtype))
    c1 = jnp.sum(g * y, axis=axis, keepdims=True)
    centred = g - c1
    c2 = jnp.sum(centred * y, axis=axis, keepdims=True)
    if p_sink is not None:
        c2 = c2 - p_sink * c1
    elif dominant is not None:
        # c2 is c1's rounding error recovered through sum(y) == 1, which is what a dominant
        # entry needs; in a row without one, y's own rounding errors make c2 mostly noise
        # (worst 3329 ULP on normal_x1 with it, 1425 without; jax.nn 2102), so it is used
        # where the largest share exceeds one half.
        c2 = jnp.where(dominant, c2, 0.0)
    # Exactly zero where y is: a NaN row sum (from a NaN logit elsewhere in the row) must
    # not reach masked places either.
    grad_x = jnp.where(y == 0, 0.0, y * (centred - c2))
    grad_sink = None if p_sink is None else p_sink * (-c1 - c2)
    return grad_x, grad_sink


def _softmax_jvp(axis, y, p_sink, x_dot, sink_dot):
    # The same J applied to a tangent: y * (x_dot - sum(y * x_dot) - p_sink * sink_dot).
    dtype = compute_dtype(y.dtype)
    y = y.astype(dtype)
    x_dot = jnp.where(y == 0, 0.0, x_dot.astype(dtype))
    mean = jnp.sum(y * x_dot, axis=axis, keepdims=True)
    if p_sink is not None:
        mean = mean + p_sink * sink_dot
    return jnp.where(y == 0, 0.0, y * (x_dot - mean))


def _softmax_values(x, where, sink, axis):
    """``_softmax_primal``, from the row kernel where it applies and the program runs on
    the CPU."""
    if where is not None or sink is not None or not _kernels_apply(x, axis):
        return _softmax_primal(x, where, sink, axis)

    def kernel(x):
        y, total = _softmax_rows(_as_rows(x, axis))
        return y.reshape(x.shape).astype(x.dtype), _from_rows(total < 2, x, axis)

    def pure_jax(x):
        y, _, dominant = _softmax_primal(x, None, None, axis)
        return y, dominant

    y, dominant = _cpu_calls.on_cpu(kernel, pure_jax, x)
    return y, None, dominant


def _softmax_grad(axis, y, p_sink, g, dominant):
    """``_softmax_vjp``, from the row kernel where it applies: the rule reads only y, so it
    serves masked rows too (their masked entries have y == 0), but not a sink."""
    if p_sink is not None or not _kernels_apply(y, axis):
        return _softmax_vjp(axis, y, p_sink, g, dominant)

    def kernel(y, g, dominant):
        # The kernel finds the dominant rows itself (largest share above one half).
        return _softmax_grad_rows(_as_rows(y, axis), _as_rows(g, axis)).reshape(y.shape)

    def pure_jax(y, g, dominant):
        return _softmax_vjp(axis, y, None, g, dominant)[0]

    return _cpu_calls.on_cpu(kernel, pure_jax, y, g, dominant), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def softmax_vjp_op(x, where, sink, axis):
    return _softmax_values(x, where, sink, axis)[0]


@allow_rank_promotion
def _softmax_fwd(x, where, sink, axis):
    y, p_sink, dominant = _softmax_values(x, where, sink, axis)
    return y, (y, p_sink, dominant)


@allow_rank_promotion
def _softmax_bwd(axis, residuals, g):
    y, p_sink, dominant = residuals
    grad_x, grad_sink = _softmax_grad(axis, y, p_sink, g, dominant)
    grad_sink = None if grad_sink is None else grad_sink.astype(p_sink.dtype)
    return grad_x.astype(y.dtype), None, grad_sink


softmax_vjp_op.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def softmax_jvp_op(x, where, sink, axis):
    return _softmax_values(x, where, sink, axis)[0]


@softmax_jvp_op.defjvp
@allow_rank_promotion
def _softmax_jvp_rule(axis, primals, tangents):
    x, where, sink = primals
    x_dot, _, sink_dot = tangents
    y, p_sink, _ = _softmax_values(x, where, sink, axis)
    return y, _softmax_jvp(axis, y, p_sink, x_dot, sink_dot).astype(y.dtype)


# --------------------------------------------------------------------------------------
# log_softmax:  y_i = x_i - log(sum_j exp(x_j))
# --------------------------------------------------------------------------------------


def _log_softmax_primal(x, where, axis):
    """Return ``(y, rows)``: the log-softmax in ``x.dtype``, and per row the max and the
    total ``sum(exp(x - shift))``."""
    out_dtype = x.dtype
    x = x.astype(compute_dtype(out_dtype))
    top = _row_max(x, where, None, axis)
    shift, has_posinf = _shift_of_row_max(top)
    d, err, _ = _shift(x, where, shift, has_posinf)
    e = _exp_corrected(d, err)
    # log(sum_j exp(d_j)) = log1p(sum_j exp(d_j) - 1). A row with one dominant entry has
    # e == 1 there and a tiny rest, which float addition to 1 would lose (jax.nn returns
    # exactly 0.0 at the arg-max where the truth is -7.1e-12). So the "- 1" is taken before
    # summing: rest sums e - floor(e), which is e below the max and exactly 0 where e == 1
    # (e <= 1 always). While total < 2, exactly one entry has e == 1, so total - 1 = rest;
    # from 2 on, total - 1 is exact and loses nothing that matters. floor has derivative 0,
    # so both sums differentiate like the plain sum. Both reductions read e and nothing
    # else, with no select, which lets XLA run them as fused reductions.
    total = jnp.sum(e, axis=axis, keepdims=True)
    rest = jnp.sum(e - jnp.floor(e), axis=axis, keepdims=True)
    lse = jnp.log1p(jnp.where(total < 2, rest, total - 1))
    x = _recomputed(x)
    d, err, dead = _shift(x, where, shift, has_posinf)
    y = jnp.where(dead | (d == -jnp.inf), -jnp.inf, (d - lse) + err)
    y = jnp.where(_nan_rows(x, where, axis) & ~_exempt_from_nan(x, where), jnp.nan, y)
    # A row with nothing unmasked has total == 0; it has no live entry to use the total.
    return y.astype(out_dtype), (top, jnp.where(total == 0, 1.0, total))


def _log_softmax_vjp(axis, y, g):
    # d y_i / d x_j = delta_ij - softmax_j, so the VJP is g - exp(y) * sum(g). Entries at
    # -inf (masked, or a row with nothing unmasked) are constants: they neither take nor give
    # gradient.
    dtype = compute_dtype(y.dtype)
    y = y.astype(dtype)
    live = y != -jnp.inf
    g = jnp.where(live, g.astype(dtype), 0.0)
    total = jnp.sum(g, axis=axis, keepdims=True)
    return jnp.where(live, g - jnp.exp(y) * total, 0.0)


def _log_softmax_vjp_from_input(axis, x, rows, g):
    # The same g - softmax(x) * sum(g), with softmax(x) = exp(x - shift) / total rebuilt
    # from x the way the forward pass built it (the shift's rounding carried by TwoSum).
    # exp(y) would be worse: y = (x - shift) - lse is larger in magnitude than x - shift,
    # so its rounding is a larger absolute error in the exponent (normal_x1: 6719 ULP worst
    # from y, jax.nn 6395).
    top, total = rows
    x = x.astype(compute_dtype(x.dtype))
    d, err, dead = _shift(x, None, *_shift_of_row_max(top))
    live = ~dead & (d != -jnp.inf)
    g = jnp.where(live, g.astype(x.dtype), 0.0)
    g_total = jnp.sum(g, axis=axis, keepdims=True)
    p = _exp_corrected(d, err) * (1 / total)
    dx = jnp.where(live, g - p * g_total, 0.0)
    return jnp.where(_nan_rows(x, None, axis) & (x != -jnp.inf), jnp.nan, dx)


def _log_softmax_jvp(axis, y, x_dot):
    dtype = compute_dtype(y.dtype)
    y = y.astype(dtype)
    live = y != -jnp.inf
    x_dot = jnp.where(live, x_dot.astype(dtype), 0.0)
    mean = jnp.sum(jnp.exp(y) * x_dot, axis=axis, keepdims=True)
    return jnp.where(live, x_dot - mean, 0.0)


@jax.tree_util.register_pytree_node_class
class _LogSoftmaxRows:
    """The per-row values log_softmax's backward pass reads, and which path made them:
    ``(max, total)`` from the pure-JAX code, ``(shift, rest)`` (the log-sum-exp as a float
    pair) from the row kernel. ``dispatched`` records that the forward pass left the
    choice to the platform, so that the backward pass makes the same one even if it is
    traced under other switches."""

    def __init__(self, first, second, dispatched):
        self.first, self.second, self.dispatched = first, second, dispatched

    def tree_flatten(self):
        return (self.first, self.second), self.dispatched

    @classmethod
    def tree_unflatten(cls, dispatched, children):
        return cls(*children, dispatched)


def _log_softmax_values(x, where, axis):
    """``_log_softmax_primal``, from the row kernel where it applies and the program runs
    on the CPU; the per-row values are a ``_LogSoftmaxRows``."""
    if where is not None or not _kernels_apply(x, axis) or not _cpu_library.available():
        y, rows = _log_softmax_primal(x, where, axis)
        return y, _LogSoftmaxRows(*rows, dispatched=False)

    def kernel(x):
        y, shift, rest = _log_softmax_rows(_as_rows(x, axis))
        rows = (_from_rows(shift, x, axis), _from_rows(rest, x, axis))
        return y.reshape(x.shape).astype(x.dtype), rows

    y, rows = _cpu_calls.on_cpu(kernel, lambda x: _log_softmax_primal(x, None, axis), x)
    return y, _LogSoftmaxRows(*rows, dispatched=True)


def _log_softmax_grad_from_input(axis, x, rows, g):
    """``_log_softmax_vjp_from_input``, from the row kernel where the forward pass used
    it."""
    if not rows.dispatched:
        return _log_softmax_vjp_from_input(axis, x, (rows.first, rows.second), g)

    def kernel(x, shift, rest, g):
        per_row = (shift.reshape(-1), rest.reshape(-1))
        dx = _log_softmax_grad_rows(_as_rows(x, axis), *per_row, _as_rows(g, axis))
        return dx.reshape(x.shape)

    def pure_jax(x, top, total, g):
        return _log_softmax_vjp_from_input(axis, x, (top, total), g)

    return _cpu_calls.on_cpu(kernel, pure_jax, x, rows.first, rows.second, g, decided=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def log_softmax_vjp_op(x, where, axis):
    return _log_softmax_values(x, where, axis)[0]


@allow_rank_promotion
def _log_softmax_fwd(x, where, axis):
    y, rows = _log_softmax_values(x, where, axis)
    # Without a mask the backward pass keeps x, the rows' values and nothing else; with one
    # it keeps y, whose -inf entries mark the masked places (keeping x would mean keeping
    # the mask too).
    if where is None:
        return y, (None, x, rows)
    return y, (y, None, None)


@allow_rank_promotion
def _log_softmax_bwd(axis, residuals, g):
    y, x, rows = residuals
    if y is None:
        return _log_softmax_grad_from_input(axis, x, rows, g).astype(x.dtype), None
    return _log_softmax_vjp(axis, y, g).astype(y.dtype), None


log_softmax_vjp_op.defvjp(_log_softmax_fwd, _log_softmax_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def log_softmax_jvp_op(x, where, axis):
    return _log_softmax_values(x, where, axis)[0]


@log_softmax_jvp_op.defjvp
@allow_rank_promotion
def _log_softmax_jvp_rule(axis, primals, tangents):
    x, where = primals
    x_dot, _ = tangents
    y = _log_softmax_values(x, where, axis)[0]
    return y, _log_softmax_jvp(axis, y, x_dot).astype(y.dtype)


# --------------------------------------------------------------------------------------
# softplus:  y = log1p(exp(beta * x)) / beta
# --------------------------------------------------------------------------------------


def _softplus_primal(x, beta):
    out_dtype = x.dtype
    dtype = compute_dtype(out_dtype)
    x = x.astype(dtype)
    u = beta.astype(dtype) * x
    if jnp.finfo(dtype).bits <= 32:
        y = _softplus_float32(u)
    else:
        y = _softplus_float64(u)
    # Where beta * x overflows, softplus(beta * x) / beta is x itself.
    y = jnp.where(u == jnp.inf, x, y / beta.astype(dtype))
    return y.astype(out_dtype)


# Float32 softplus is polynomials only (exp included, see _exp_pair_float32): no log, no
# division, so XLA compiles it to one pass over x, in about half of jax.nn.softplus's
# time (docs/benchmarks.md). The coefficients are
# Chebyshev interpolants at 300 nodes against mpmath, rounded to float32; regenerate with
# numpy.polynomial.chebyshev.chebfit and cheb2poly.
#
# (log1p(t) - t) / t^2 on [0, exp(-1)], degree 6 (max error 8.2e-9, against values
# near -1/2).
_LOG1P_QUOTIENT_FLOAT32 = (
    -0.5,
    0.3333322,
    -0.24994957,
    0.19913994,
    -0.15951239,
    0.11082395,
    -0.04537416,
)
# (softplus(u) - log(2) - u / 2) / u^2 as a polynomial in u^2 on [0, 1], degree 4 (max
# error 7.1e-10, against values near 1/8). log(2) = _LOG2_HI + _LOG2_LO to twice float32's
# precision.
_SOFTPLUS_NEAR_ZERO_FLOAT32 = (0.125, -0.005208319, 0.00034710768, -2.602335e-05, 1.7423902e-06)
_LOG2_HI = 0.6931472
_LOG2_LO = -1.9046542e-09


def _horner(coefficients, z):
    # sum_k coefficients[k] * z^k.
    result = jnp.full_like(z, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * z + c
    return result


def _softplus_float32(u):
    # Away from 0: softplus(u) = max(u, 0) + log1p(t) with t = exp(-|u|) <= exp(-1), and
    # log1p(t) = t + t^2 * Q(t): t passes through exactly and only the correction (at most
    # 16% of log1p(t)) is rounded. Near 0, where t ~ 1 and that correction reaches 44%:
    # softplus(u) = log(2) + u / 2 + u^2 * E(u^2), where u / 2 is exact and only the last
    # two additions round. Each form is evaluated where it is chosen or at a harmless point,
    # so both stay finite under differentiation. Worst 0.98 ULP on the hard inputs op by op,
    # 1.03 under jit (jax.nn 2.82, torch 1.46).
    positive = u > 0
    near_zero = jnp.abs(u) < 1
    t, t_lo = _exp_pair_float32(jnp.where(positive, -u, u))
    # log1p(t + t_lo) = log1p(t) + t_lo / (1 + t) to first order, and 1 / (1 + t) is
    # 1 - t to within 14% here, on a term below an ulp of the result.
    log1p_t = t + ((t_lo - t_lo * t) + t * (t * _horner(_LOG1P_QUOTIENT_FLOAT32, t)))
    far = jnp.where(positive, u, 0.0) + log1p_t
    v = jnp.where(near_zero, u, 0.0)
    s = v * v
    near = _LOG2_HI + (0.5 * v + (s * _horner(_SOFTPLUS_NEAR_ZERO_FLOAT32, s) + _LOG2_LO))
    return jnp.where(near_zero, near, far)


# (expm1(r) - r) / r^2 on |r| <= log(2) / 2 (widened by 1%), degree 4 (max error 6.9e-8
# against values near 1/2, so below 1e-8 relative in exp(r)).
_EXPM1_QUOTIENT_FLOAT32 = (0.5, 0.16666573, 0.041666456, 0.008363777, 0.0013934545)
# log(2) = _LN2_HI16 + _LN2_LO, with _LN2_HI16 on 16 bits so that k * _LN2_HI16 is exact.
_LN2_HI16 = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
_LOG2_E = 1.4426950216293335


def _exp_pair_float32(a):
    """``(t, t_lo)`` with ``t + t_lo = exp(a)`` to about 2^-30 relative, for ``a <= 0``.

    XLA's exp is within an ulp; its rounding, through ``log1p``, was most of softplus's
    error and, through ``y``, of the derivative read from it. So exp is taken apart here
    as Cody and Waite do: ``a = k log(2) + r`` with ``|r| <= log(2) / 2`` (exact up to the
    rounding of ``r``), ``exp(r) = 1 + p`` with ``p = expm1(r)`` a polynomial, and
    ``1 + p`` split into a rounded sum and its exact error (Fast2Sum), both scaled by
    ``2^k``.
    """
    # Below -88, exp(a) is under float32's smallest normal (XLA on CPU flushes it to 0
    # anyway); clamping keeps k in the range of a normal power of two.
    underflow = a < -88.0
    a = jnp.maximum(a, -88.0)
    k = jnp.floor(a * _LOG2_E + 0.5)
    r = (a - k * _LN2_HI16) - k * _LN2_LO
    p = r + r * (r * _horner(_EXPM1_QUOTIENT_FLOAT32, r))
    # reduce_precision (the identity) keeps XLA from simplifying (1 - (1 + p)) + p to 0.
    s = lax.reduce_precision(1 + p, *_format_bits(p.dtype))
    s_lo = lax.stop_gradient((1 - s) + p)
    # 2^k for integral k in [-127, 0], built from its bits (k = -127 gives 0).
    biased = lax.stop_gradient(k).astype(jnp.int32) + 127
    scale = lax.bitcast_convert_type(lax.shift_left(biased, jnp.int32(23)), jnp.float32)
    scale = jnp.where(underflow, 0.0, scale)
    return s * scale, s_lo * scale


def _softplus_float64(u):
    # log1p(exp(u)) = max(u, 0) + log1p(exp(-|u|)): exp never overflows, and there is no
    # threshold where the formula switches (torch's softplus switches at u > 20). Written
    # with one select instead of max/abs so that each branch is smooth and autodiff of this
    # primal gives the right second derivative at u = 0.
    positive = u > 0
    return jnp.where(positive, u, 0.0) + _log1p_unit(jnp.exp(jnp.where(positive, -u, u)))


_LOG1P_SERIES_DEGREE = 18


def _log1p_unit(t):
    # log1p(t) for t in [0, 1]. Below a threshold, the series t + t^2 * Q(t), Q(t) = -1/2
    # + t/3 - t^2/4 + ... (degree 18, truncated below half an ulp: t < 0.14 in float64).
    # Above it, log(s) + (t - (s - 1)) / s with s = 1 + t rounded: the second term is the
    # exact rounding error of s (Fast2Sum), so this is as accurate as log.
    # reduce_precision to the same format is the identity, but it stops XLA from
    # simplifying (1 + t) - 1 to t. The error term is identically zero as a function of t,
    # hence stop_gradient is exact.
    nmant = jnp.finfo(t.dtype).nmant
    small = t < 2.0 ** (-(nmant + 2) / (_LOG1P_SERIES_DEGREE + 1))
    ts = jnp.where(small, t, 0.0)
    q = jnp.zeros_like(ts)
    for k in range(_LOG1P_SERIES_DEGREE, 1, -1):
        q = q * ts + (-1.0) ** (k + 1) / k
    series = ts + (ts * ts) * q
    s = 1 + t
    s_rounded = lax.reduce_precision(s, *_format_bits(s.dtype))
    err = lax.stop_gradient(t - (s_rounded - 1))
    return jnp.where(small, series, jnp.log(s) + err / s)


def _format_bits(dtype):
    info = jnp.finfo(dtype)
    return info.nexp, info.nmant


# -expm1(-v) = v + v^2 * P(v) on [0, log 2], with the Taylor series P(v) = sum_{k >= 2}
# (-v)^(k - 2) * (-1/k!), to degree 11 for float32 and 17 for float64 (truncation below
# 5e-11 and 1e-18 relative).
_NEG_EXPM1_QUOTIENT = {
    bits: tuple((-1.0) ** (k + 1) / math.factorial(k) for k in range(2, degree + 1))
    for bits, degree in ((32, 11), (64, 17))
}


def _neg_expm1(v):
    # -expm1(-v) for v >= 0. Below log(2), where 1 - exp(-v) cancels, the polynomial is
    # more accurate than XLA's CPU expm1 (4.6 ULP) and cheaper; it is evaluated as
    # v + v^2 * P(v), so v passes through exactly and only the small correction is
    # rounded. Above it, 1 - exp(-v) loses nothing.
    small = v < math.log(2.0)
    z = jnp.where(small, v, 0.0)
    coefficients = _NEG_EXPM1_QUOTIENT[max(32, jnp.finfo(v.dtype).bits)]
    return jnp.where(small, z + z * (z * _horner(coefficients, z)), 1 - jnp.exp(-v))


def _softplus_sigmoid(y, beta):
    """sigmoid(beta * x), from the output: beta * y = softplus(u) and 1 - exp(-softplus(u))
    = sigmoid(u), so sigmoid = -expm1(-beta * y)."""
    dtype = compute_dtype(y.dtype)
    return _neg_expm1(beta.astype(dtype) * y.astype(dtype))


def _softplus_beta_slope(y, beta):
    """d y / d beta, from the output alone.

    With v = beta * y = softplus(u), u = beta * x and s = sigmoid(u) = -expm1(-v):
    u = v + log(s) (softplus inverted), so
    d y / d beta = (x * s - y) / beta = (s * log(s) - v * exp(-v)) / beta^2.
    Both terms are computed without cancellation; each vanishes at v = 0 and v = inf.
    """
    dtype = compute_dtype(y.dtype)
    beta = beta.astype(dtype)
    v = beta * y.astype(dtype)
    exp_neg_v = jnp.exp(-v)
    sig = _neg_expm1(v)
    # log(s) = log1p(-exp(-v)) is the accurate form once s > 1/2. Each branch gets inputs
    # that keep it finite where it is not selected, so second derivatives stay finite too.
    large = v > jnp.log(2.0)
    sig_safe = jnp.where(large | (sig == 0), 1.0, sig)
    exp_neg_v_safe = jnp.where(large, exp_neg_v, 0.5)
    log_sig = jnp.where(large, jnp.log1p(-exp_neg_v_safe), jnp.log(sig_safe))
    v_safe = jnp.where(v == jnp.inf, 0.0, v)
    return (sig * log_sig - v_safe * exp_neg_v) / (beta * beta)


def _sum_to_shape(t, shape):
    """Sum a cotangent over the axes along which an argument of ``shape`` was broadcast."""
    extra = t.ndim - len(shape)
    t = jnp.sum(t, axis=tuple(range(extra))) if extra else t
    kept = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return jnp.sum(t, axis=kept, keepdims=True) if kept else t


@jax.custom_vjp
def softplus_vjp_op(x, beta):
    return _softplus_primal(x, beta)


@allow_rank_promotion
def _softplus_fwd(x, beta):
    y = _softplus_primal(x, beta)
    return y, (y, beta)


@allow_rank_promotion
def _softplus_bwd(residuals, g):
    # softplus'(u) = sigmoid(u), read from the output: g * -expm1(-beta * y).
    y, beta = residuals
    sig = _softplus_sigmoid(y, beta)
    g = g.astype(sig.dtype)
    grad_beta = _sum_to_shape(g * _softplus_beta_slope(y, beta), beta.shape)
    grad_beta = grad_beta.astype(beta.dtype)
    return (g * sig).astype(y.dtype), grad_beta


softplus_vjp_op.defvjp(_softplus_fwd, _softplus_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softplus_fixed_beta_vjp_op(x, beta):
    """softplus for a constant Python ``beta``: no beta gradient to compute or keep."""
    return _softplus_fixed_beta_values(x, beta)


# With a constant beta, float32 softplus and its derivative run the CPU kernels (the same
# algorithm, in AVX-512 or AVX2 rather than XLA's vector width) where they apply.


def _softplus_reference(x, beta):
    return _softplus_primal(x, jnp.asarray(beta, jnp.float32))


@_with_derivative_of(_softplus_reference, static_trailing=1)
def _softplus_kernel(x, beta):
    return _cpu_calls.softplus(x, beta)


def _softplus_grad_reference(y, g, beta):
    return g * _softplus_sigmoid(y, jnp.asarray(beta, jnp.float32))


@_with_derivative_of(_softplus_grad_reference, static_trailing=1)
def _softplus_grad_kernel(y, g, beta):
    return _cpu_calls.softplus_grad(y, g, beta)


def _softplus_fixed_beta_values(x, beta):
    if not _kernels_take(x):
        return _softplus_primal(x, jnp.asarray(beta))

    def kernel(x):
        return _softplus_kernel(x.astype(jnp.float32), beta).astype(x.dtype)

    return _cpu_calls.on_cpu(kernel, lambda x: _softplus_primal(x, jnp.asarray(beta)), x)


@allow_rank_promotion
def _softplus_fixed_beta_fwd(x, beta):
    y = _softplus_fixed_beta_values(x, beta)
    return y, y


@allow_rank_promotion
def _softplus_fixed_beta_bwd(beta, y, g):
    def pure_jax(y, g):
        sig = _softplus_sigmoid(y, jnp.asarray(beta))
        return (g.astype(sig.dtype) * sig).astype(y.dtype)

    if not _kernels_take(y):
        return (pure_jax(y, g),)

    def kernel(y, g):
        f32 = jnp.float32
        return _softplus_grad_kernel(y.astype(f32), g.astype(f32), beta).astype(y.dtype)

    return (_cpu_calls.on_cpu(kernel, pure_jax, y, g),)


softplus_fixed_beta_vjp_op.defvjp(_softplus_fixed_beta_fwd, _softplus_fixed_beta_bwd)


@jax.custom_jvp
def softplus_jvp_op(x, beta):
    return _softplus_primal(x, beta)


@softplus_jvp_op.defjvp
@allow_rank_promotion
def _softplus_jvp_rule(primals, tangents):
    x, beta = primals
    x_dot, beta_dot = tangents
    y = _softplus_primal(x, beta)
    sig = _softplus_sigmoid(y, beta)
    d_beta = _softplus_beta_slope(y, beta)
    y_dot = sig * x_dot.astype(sig.dtype) + d_beta * beta_dot.astype(sig.dtype)
    return y, y_dot.astype(y.dtype)
