"""The public functional API: argument checks, then the shared core in ``_core``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stablelayers import _checks, _core
from stablelayers._mode import forward_mode_enabled
from stablelayers._rank_promotion import allow_rank_promotion

Axis = int | Sequence[int] | None


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
    x, axis, where = _prepare(x, axis, where, initial)
    if x.size == 0:
        return jnp.zeros_like(x)
    op = _core.softmax_jvp_op if forward_mode_enabled() else _core.softmax_vjp_op
    return op(x, where, None, axis)


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
    x, axis, where = _prepare(x, axis, where, initial)
    sink = _checks.check_sink(sink, x.shape, axis)
    if x.size == 0:
        return jnp.zeros_like(x)
    op = _core.softmax_jvp_op if forward_mode_enabled() else _core.softmax_vjp_op
    return op(x, where, sink, axis)


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
    x, axis, where = _prepare(x, axis, where, initial)
    if x.size == 0:
        return jnp.zeros_like(x)
    op = _core.log_softmax_jvp_op if forward_mode_enabled() else _core.log_softmax_vjp_op
    return op(x, where, axis)


@allow_rank_promotion
def softplus(x: ArrayLike, beta: ArrayLike = 1.0) -> jax.Array:
    r"""Softplus with a temperature, accurate over the whole float range.

    .. math::
        \mathrm{softplus}(x; \beta) = \frac{\log(1 + e^{\beta x})}{\beta}
        = \frac{\max(\beta x, 0) + \mathrm{log1p}(e^{-|\beta x|})}{\beta}

    There is no threshold where the formula switches, so no kink: ``+inf -> +inf``,
    ``-inf -> 0``, ``nan -> nan``. The derivative is ``sigmoid(beta * x)``, computed in the
    backward pass from the output alone as ``-expm1(-beta * y)``, so only ``y`` is kept.

    Args:
        x: input of any shape (integers promoted; half precision computed in float32).
        beta: positive temperature, a Python number or an array broadcastable to
            ``x.shape``. An array ``beta`` is differentiable (a learnable sharpness); a
            Python number is a constant.

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        ValueError: a concrete ``beta`` is not positive and finite. A traced ``beta`` is
            not checked (docs/semantics.md says what the formula then gives).
    """
    x = _checks.as_float_array(x)
    _checks.check_beta(beta)
    if isinstance(beta, (int, float)) and not forward_mode_enabled():
        return _core.softplus_fixed_beta_vjp_op(x, float(beta))
    beta = _checks.as_float_array(beta, "beta")
    if not _checks.broadcasts_to(beta.shape, x.shape):
        raise ValueError(
            f"`beta` of shape {beta.shape} does not broadcast to the input's shape {x.shape}."
        )
    op = _core.softplus_jvp_op if forward_mode_enabled() else _core.softplus_vjp_op
    return op(x, beta)


def _prepare(
    x: ArrayLike, axis: Axis, where: ArrayLike | None, initial: ArrayLike | None
) -> tuple[jax.Array, tuple[int, ...], jax.Array | None]:
    x = _checks.as_float_array(x)
    axis = _checks.canonical_axis(axis, x.ndim)
    where = _checks.check_where(where, x.shape)
    _checks.check_initial(initial, _checks.reduced_shape(x.shape, axis))
    return x, axis, where
