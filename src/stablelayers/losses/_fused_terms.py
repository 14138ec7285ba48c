r"""The arithmetic both fused cross-entropies share, per token and per block of logits.

With ``lse`` the log-sum-exp of a token's live logits ``l``, ``t`` its label's logit,
``S`` the sum of its live logits and ``K`` the number of live classes:

.. math::
    \ell = \mathrm{lse} - (1 - \epsilon) t - \frac{\epsilon}{K} S + z\,\mathrm{lse}^2,
    \qquad
    \frac{\partial \ell}{\partial l_j} = (1 + 2 z\,\mathrm{lse}) p_j - q_j

with ``p = softmax(l)`` and ``q = (1 - eps) onehot + eps / K`` over the live classes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stablelayers._core import arithmetic

Coefficients = tuple[jax.Array, jax.Array, jax.Array | None]
# (h (tokens, hidden), weight (hidden, vocab), bias (vocab,) or None, labels (tokens,),
# vocab_mask (vocab,), valid (tokens,), eps (), z ()): the array arguments of the fused ops.
# The options are arrays (a traced or scheduled value is taken as it is, and the loss is
# differentiable in it); a static flag leaves a concrete 0's term out of the graph.
Inputs = tuple[
    jax.Array,
    jax.Array,
    jax.Array | None,
    jax.Array,
    jax.Array,
    jax.Array,
    jax.Array,
    jax.Array,
]
# (smoothing on, z-loss on): whether eps and z may be nonzero.
Flags = tuple[bool, bool]


def options(args: Inputs, flags: Flags) -> tuple[jax.Array | None, jax.Array | None]:
    """``(eps, z)`` from ``args``, ``None`` for an option that is a concrete 0."""
    return (args[6] if flags[0] else None), (args[7] if flags[1] else None)


def acc_dtype(x: jax.Array) -> jnp.dtype:
    """The dtype products accumulate in and per-token values are computed in: float32
    (float64 for float64 inputs); half precision is read as it is and rounded only at
    the end."""
    return arithmetic.compute_dtype(x.dtype)


def block_start(c: jax.Array | int, size: int, length: int) -> tuple[jax.Array, jax.Array]:
    """Block ``c`` of ``size`` along an axis of ``length``: its first index, and ``fresh``
    ``(size,)``, True where no earlier block held the index. The last block, when ``size``
    does not divide ``length``, starts at ``length - size`` and overlaps the one before:
    nothing is padded or copied."""
    start = jnp.minimum(c * size, length - size)
    return start, start + jnp.arange(size) >= c * size


def take(x: jax.Array, start: jax.Array, size: int, axis: int) -> jax.Array:
    """``x``'s ``size`` entries from ``start`` along ``axis`` (``lax.dynamic_slice_in_dim``).

    Half-precision arrays are sliced as their bits: XLA's CPU backend computes a
    half-precision dynamic slice in float32 and hoists the upcast of the whole array
    (every weight column, or every token) out of the loop, a float32 copy as large as
    the input."""
    if x.dtype.itemsize >= 4:
        return lax.dynamic_slice_in_dim(x, start, size, axis)
    return _take_bits(x, start, size, axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _take_bits(x: jax.Array, start: jax.Array, size: int, axis: int) -> jax.Array:
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    return lax.bitcast_convert_type(lax.dynamic_slice_in_dim(bits, start, size, axis), x.dtype)


@_take_bits.defjvp
def _take_bits_jvp(
    size: int, axis: int, primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, ...]
) -> tuple[jax.Array, jax.Array]:
    # A slice is linear: its tangent is the tangent's slice (bit casts have no derivative).
    x, start = primals
    out = _take_bits(x, start, size, axis)
    return out, lax.dynamic_slice_in_dim(tangents[0], start, size, axis)


def exact_lse(logits: jax.Array, live: jax.Array) -> jax.Array:
    """``(rows,)`` log-sum-exp of ``logits`` ``(rows, vocab)`` over the ``live`` columns,
    ``max + log(sum e^{l - max})`` in the logits' dtype; a row with no live column gives
    the dtype's lowest finite value (its loss is zeroed by the caller)."""
    lowest = np.finfo(logits.dtype).min
    x = jnp.where(live, logits, lowest)
    # The shift cancels in value and derivative; stopping its gradient keeps max's
    # tie-splitting rule out of the derivative.
    m = lax.stop_gradient(jnp.max(x, axis=1))
    s = jnp.sum(jnp.where(live, jnp.exp(x - m[:, None]), 0.0), axis=1)
    return m + jnp.log(jnp.where(s == 0, 1.0, s))


def loss_terms(
    lse: jax.Array,
    target: jax.Array,
    total: jax.Array,
    valid: jax.Array,
    count: jax.Array,
    smoothing: jax.Array | None,
    z_loss: jax.Array | None,
) -> jax.Array:
    """``(rows,)`` loss ``lse - (1 - eps) t - eps S / K + z lse^2``, 0 where not ``valid``."""
    if smoothing is None:
        loss = lse - target
    else:
        loss = lse - (1.0 - smoothing) * target - (smoothing / count) * total
    if z_loss is not None:
        loss = loss + z_loss * lse * lse
    return jnp.where(valid, loss, 0.0)


def option_terms(
    lse: jax.Array, target: jax.Array, total: jax.Array, valid: jax.Array, count: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(d loss / d eps, d loss / d z)`` per row: ``t - S / K`` and ``lse^2`` (the loss is
    linear in both), 0 where not ``valid``."""
    return (
        jnp.where(valid, target - total / count, 0.0),
        jnp.where(valid, lse * lse, 0.0),
    )


def coefficients(
    g: jax.Array,
    lse: jax.Array,
    valid: jax.Array,
    smoothing: jax.Array | None,
    z_loss: jax.Array | None,
) -> Coefficients:
    """Per-token weights of ``dloss/dlogits`` for cotangents ``g``:
    ``(g (1 + 2 z lse), g (1 - eps), g eps)``, all 0 where not ``valid``; the last is
    ``None`` without smoothing."""
    g = jnp.where(valid, g.astype(lse.dtype), 0.0)
    scale = g if z_loss is None else g * (1.0 + 2.0 * z_loss * lse)
    if smoothing is None:
        return scale, g, None
    return scale, g * (1.0 - smoothing), g * smoothing


def dlogits(
    logits: jax.Array,
    live: jax.Array,
    hit: jax.Array,
    lse: jax.Array,
    coef: Coefficients,
    count: jax.Array,
) -> jax.Array:
    """``G = g ((1 + 2 z lse) p - q)`` for a block of ``logits`` ``(rows, cols)``; ``live``
    and ``hit`` (the label's column) broadcast to it, ``lse`` and ``coef`` are per row."""
    scale, on_label, spread = coef
    # exp(l - lse) <= 1 by construction; the minimum keeps a recomputed logit that
    # rounds above lse from making p > 1.
    p = jnp.where(live, jnp.exp(jnp.minimum(logits - lse[:, None], 0.0)), 0.0)
    grad = scale[:, None] * p - jnp.where(hit, on_label[:, None], 0.0)
    if spread is not None:
        grad = grad - jnp.where(live, spread[:, None] / count, 0.0)
    return grad
