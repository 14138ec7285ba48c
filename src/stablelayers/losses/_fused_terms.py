r"""The arithmetic both fused cross-entropies share, per token and per block of logits.

With ``lse`` the log-sum-exp of a token's live logits ``l``, ``t`` its label's logit,
``S`` the sum of its live logits and ``K`` the number of live classes:

.. math::
    \ell = (1 - \epsilon)\,\tau\,(\mathrm{lse} - t)
        + \epsilon\,(\mathrm{lse} - S / K) + z\,\mathrm{lse}^2,
    \qquad
    \frac{\partial \ell}{\partial l_j}
        = ((1 - \epsilon)\tau + \epsilon + 2 z\,\mathrm{lse}) p_j - q_j

with ``p = softmax(l)``, ``q = (1 - eps) tau onehot + eps / K`` over the live classes and
``tau = 1`` unless the label's class is masked (its target mass dropped, ``t = 0``).
With a logit soft-cap ``c`` (:mod:`~stablelayers.losses._soft_cap`) ``l`` is the capped
block ``c tanh(z / c)`` of the raw logits ``z = h W + b``, and the gradient is carried back
through it, ``dl/dz = 1 - tanh^2(z / c)``, before the products with ``h`` and ``W``.
Also the records both ops take (:class:`Inputs`, :class:`Flags`) and their one block
walker (:func:`block`: a block of tokens, or of vocabulary columns, and its logits).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stablelayers._core import arithmetic
from stablelayers.losses import _soft_cap

Coefficients = tuple[jax.Array, jax.Array, jax.Array | None]


class Inputs(NamedTuple):
    """The array arguments of the fused ops (a pytree: the differentiable ones get
    cotangents and tangents of the same record).

    The options are arrays: a traced or scheduled value is taken as it is, and the loss is
    differentiable in it; a static :class:`Flags` leaves a concrete 0's term out of the
    graph.
    """

    hidden: jax.Array  # (tokens, hidden)
    weight: jax.Array  # (hidden, vocab), hidden's dtype
    bias: jax.Array | None  # (vocab,)
    labels: jax.Array  # (tokens,) integer
    vocab_mask: jax.Array  # (vocab,) bool: the classes in the softmax
    counted: jax.Array  # (tokens,) bool: not ignore_index (and some class unmasked)
    missed: jax.Array | None  # (tokens,) bool: the label's class masked; None: no mask
    label_smoothing: jax.Array  # ()
    z_loss: jax.Array  # ()
    logits_soft_cap: jax.Array | None = None  # (): c > 0; None: no cap (no op)


class Flags(NamedTuple):
    """Whether ``label_smoothing`` and ``z_loss`` may be nonzero, and whether the loss's
    derivative in the soft-cap is formed (a traced cap; a concrete one is a constant)
    (static)."""

    smoothing: bool
    z_loss: bool
    soft_cap_grad: bool = False


def cotangents(
    hidden: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    label_smoothing: jax.Array | None,
    z_loss: jax.Array | None,
    soft_cap: jax.Array | None = None,
) -> tuple[Inputs]:
    """A backward rule's answer: the cotangents of the differentiable inputs, ``None``
    (zero) for the integer and boolean ones and for an option that is off (or, for the
    soft-cap, a constant)."""
    none: Any = None  # custom_vjp reads None as a zero cotangent
    eps: Any = label_smoothing
    z: Any = z_loss
    cap: Any = soft_cap
    return (Inputs(hidden, weight, bias, none, none, none, none, eps, z, cap),)


def options(inputs: Inputs, flags: Flags) -> tuple[jax.Array | None, jax.Array | None]:
    """``(eps, z)`` from ``inputs``, ``None`` for an option that is a concrete 0."""
    eps = inputs.label_smoothing if flags.smoothing else None
    return eps, (inputs.z_loss if flags.z_loss else None)


def class_count(inputs: Inputs) -> jax.Array:
    """``K``, the number of live classes (at least 1), in the accumulation dtype."""
    return jnp.maximum(jnp.sum(inputs.vocab_mask), 1).astype(acc_dtype(inputs.hidden))


def acc_dtype(x: jax.Array) -> jnp.dtype:
    """The dtype products accumulate in and per-token values are computed in: float32
    (float64 for float64 inputs); half precision is read as it is and rounded only at
    the end."""
    return arithmetic.compute_dtype(x.dtype)


class Span(NamedTuple):
    """Block ``c`` of ``size`` along an axis: its first index ``start``, and ``fresh``
    ``(size,)``, True where no earlier block held the index."""

    start: jax.Array
    size: int
    fresh: jax.Array


def span(c: jax.Array | int, size: int, length: int) -> Span:
    """Block ``c`` of ``size`` along an axis of ``length``. The last block, when ``size``
    does not divide ``length``, starts at ``length - size`` and overlaps the one before:
    nothing is padded or copied."""
    start = jnp.minimum(c * size, length - size)
    return Span(start, size, start + jnp.arange(size) >= c * size)


def block_count(length: int, size: int) -> int:
    """How many blocks of ``size`` cover ``length``."""
    return -(-length // size)


class Capped(NamedTuple):
    """A block's raw logits under a soft-cap ``c``: ``u = z / c`` and ``t = tanh u``."""

    scaled: jax.Array  # (rows, cols)
    tanh: jax.Array  # (rows, cols)


class Block(NamedTuple):
    """A block of the logits, in the accumulation dtype: some tokens (``rows``) against
    some vocabulary columns (``cols``), or all of either."""

    hidden: jax.Array  # (rows, hidden): the block's tokens
    weight: jax.Array  # (hidden, cols): the block's columns
    logits: jax.Array  # (rows, cols) = hidden @ weight + bias, soft-capped if asked
    live: jax.Array  # (1, cols): unmasked and, along a walked axis, fresh
    hit: jax.Array  # (rows, cols): live and the label's column
    capped: Capped | None = None  # None: no soft-cap


def raw_grad(grad: jax.Array, b: Block) -> jax.Array:
    """The gradient in the raw logits ``z`` from that in the block's ``logits``: times
    ``1 - tanh^2(z / c)`` under a soft-cap, else ``grad`` itself (no op)."""
    return grad if b.capped is None else grad * _soft_cap.slope(b.capped.tanh)


def cap_grad(grad: jax.Array, b: Block) -> jax.Array:
    """``sum_ij grad_ij d(c tanh(z_ij / c))/dc``: the loss's derivative in the cap, for
    ``grad`` in the block's (capped) logits."""
    assert b.capped is not None
    u, t = b.capped
    return jnp.sum(grad * _soft_cap.cap_derivative(u, t))


def cap_tangent(b: Block, z_dot: jax.Array, cap_dot: jax.Array | None) -> jax.Array:
    """The capped logits' tangent from the raw logits' ``z_dot`` (and the cap's
    ``cap_dot``, ``None`` for a constant cap); ``z_dot`` itself without a cap."""
    if b.capped is None:
        return z_dot
    u, t = b.capped
    dot = _soft_cap.slope(t) * z_dot
    if cap_dot is not None:
        dot = dot + _soft_cap.cap_derivative(u, t) * cap_dot.astype(dot.dtype)
    return dot


def block(inputs: Inputs, rows: Span | None, cols: Span | None) -> Block:
    """The logits of ``rows`` of the tokens against ``cols`` of the vocabulary (``None``:
    the whole axis, not sliced). The one walker of both fused ops: the per-token op walks
    the columns, the summed op the tokens."""
    h, w, b, labels = inputs.hidden, inputs.weight, inputs.bias, inputs.labels
    if rows is not None:
        h = take(h, rows.start, rows.size, 0)
        labels = lax.dynamic_slice_in_dim(labels, rows.start, rows.size)
    if cols is None:
        ids = jnp.arange(w.shape[1])
        live = inputs.vocab_mask[None, :]
    else:
        w = take(w, cols.start, cols.size, 1)
        b = None if b is None else take(b, cols.start, cols.size, 0)
        ids = cols.start + jnp.arange(cols.size)
        live = (cols.fresh & inputs.vocab_mask[ids])[None, :]
    acc = acc_dtype(h)
    logits = jnp.matmul(h, w, preferred_element_type=acc)
    if b is not None:
        logits = logits + b.astype(acc)[None, :]
    capped = None
    if inputs.logits_soft_cap is not None:
        cap = inputs.logits_soft_cap.astype(acc)
        u = logits / cap
        capped = Capped(u, jnp.tanh(u))
        logits = cap * capped.tanh
    hit = live & (ids[None, :] == labels[:, None])
    return Block(h, w, logits, live, hit, capped)


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
    (x, start), (x_dot, _) = primals, tangents
    out = _take_bits(x, start, size, axis)
    return out, lax.dynamic_slice_in_dim(x_dot, start, size, axis)


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
    counted: jax.Array,
    count: jax.Array,
    smoothing: jax.Array | None,
    z_loss: jax.Array | None,
    missed: jax.Array | None = None,
) -> jax.Array:
    """``(rows,)`` loss ``(1 - eps) tl (lse - t) + eps (lse - S / K) + z lse^2``, 0 where
    not ``counted``; ``tl = 1`` unless ``missed`` (the label's class masked: its target
    mass is dropped, as :func:`softmax_cross_entropy`'s ``where`` drops it; ``t = 0``)."""
    if smoothing is None:
        loss = lse - target
    else:
        loss = lse - (1.0 - smoothing) * target - (smoothing / count) * total
    if missed is not None:
        on_label = 1.0 if smoothing is None else 1.0 - smoothing
        loss = loss - jnp.where(missed, on_label * lse, 0.0)
    if z_loss is not None:
        loss = loss + z_loss * lse * lse
    return jnp.where(counted, loss, 0.0)


def option_terms(
    lse: jax.Array,
    target: jax.Array,
    total: jax.Array,
    counted: jax.Array,
    count: jax.Array,
    missed: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(d loss / d eps, d loss / d z)`` per row: ``lse - S / K - tl (lse - t)`` and
    ``lse^2`` (the loss is linear in both), 0 where not ``counted``."""
    d_eps = target - total / count
    if missed is not None:
        d_eps = d_eps + jnp.where(missed, lse, 0.0)
    return (
        jnp.where(counted, d_eps, 0.0),
        jnp.where(counted, lse * lse, 0.0),
    )


def coefficients(
    g: jax.Array,
    lse: jax.Array,
    counted: jax.Array,
    smoothing: jax.Array | None,
    z_loss: jax.Array | None,
    missed: jax.Array | None = None,
) -> Coefficients:
    """Per-token weights of ``dloss/dlogits`` for cotangents ``g``:
    ``(g ((1 - eps) tl + eps + 2 z lse), g (1 - eps), g eps)``, all 0 where not
    ``counted``; the last is ``None`` without smoothing. ``tl = 0`` where ``missed`` (the
    label's column is then never ``hit``, so the second weight meets no column)."""
    g = jnp.where(counted, g.astype(lse.dtype), 0.0)
    scale = g if z_loss is None else g * (1.0 + 2.0 * z_loss * lse)
    on_label = g if smoothing is None else g * (1.0 - smoothing)
    if missed is not None:
        scale = scale - jnp.where(missed, on_label, 0.0)
    if smoothing is None:
        return scale, g, None
    return scale, on_label, g * smoothing


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
