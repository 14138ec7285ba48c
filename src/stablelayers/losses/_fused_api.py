r"""linear_softmax_cross_entropy: the loss of ``softmax(hidden @ weight + bias)`` without
ever forming the ``(tokens, vocab)`` logits, forward or backward.

After Wijmans et al. (ICLR 2025, "Cut Your Losses in Large-Vocabulary Language Models"),
in pure JAX. With ``reduction='none'`` (the loss per token) the vocabulary is walked in
blocks of ``chunk_size`` columns:

* forward: each block's logits ``l = h W_c + b_c`` feed an online log-sum-exp
  (``m' = max(m, max l)``, ``s' = s e^{m - m'} + sum e^{l - m'}``; Milakov & Gimelshein,
  2018) and pick out the target logit; only ``lse`` per token is kept.
* backward: each block's logits are recomputed, ``G = g ((1 + 2 z lse) e^{l - lse} - q)``
  formed for the block alone, and ``dh += G W_c^T``, ``dW_c = h^T G``, ``db_c = sum G``.

So the largest temporaries are ``(tokens, chunk_size)``, and the price is one more
``tokens x hidden x vocab`` product than the materialised loss (four instead of three).
With ``reduction='mean'`` or ``'sum'`` the cotangent is one number and the gradient is
formed in the forward pass instead: three products (:mod:`stablelayers.losses._fused_sum`).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from stablelayers._core import arithmetic, checks
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers._core.switches import forward_mode_enabled
from stablelayers.losses._cross_entropy import (
    check_integer_labels,
    check_loss_options,
    is_off,
    out_of_range,
    poison,
)
from stablelayers.losses._fused_sum import summed_op
from stablelayers.losses._fused_terms import (
    Inputs,
    acc_dtype,
    block_start,
    coefficients,
    dlogits,
    loss_terms,
    option_terms,
    options,
    take,
)

Reduction = Literal["none", "mean", "sum"]
Maybe = jax.Array | None
# (vocabulary columns per block, smoothing on, z-loss on).
Static = tuple[int, bool, bool]


class _Block:
    """Block ``c`` of ``size`` vocabulary columns: its logits ``(tokens, size)`` in
    float32, ``live`` (unmasked and held by no earlier block: only the last block
    overlaps) and ``hit`` (the label's column), both ``(1 or tokens, size)``."""

    def __init__(self, args: Inputs, c: jax.Array, size: int):
        h, weight, bias, labels, vocab_mask = args[:5]
        self.start, fresh = block_start(c, size, weight.shape[1])
        self.w = take(weight, self.start, size, 1)
        acc = acc_dtype(h)
        logits = jnp.matmul(h, self.w, preferred_element_type=acc)
        if bias is not None:
            logits = logits + take(bias, self.start, size, 0).astype(acc)[None, :]
        cols = self.start + jnp.arange(size)
        self.fresh = fresh
        self.live = (fresh & vocab_mask[cols])[None, :]
        self.hit = self.live & (cols[None, :] == labels[:, None])
        self.logits = logits


def _count(args: Inputs) -> jax.Array:
    """``K``, the number of live classes (at least 1), in the accumulation dtype."""
    return jnp.maximum(jnp.sum(args[4]), 1).astype(acc_dtype(args[0]))


def _blocks(args: Inputs, size: int) -> int:
    return -(-args[1].shape[1] // size)


def _forward(args: Inputs, size: int, smoothing: bool) -> tuple[jax.Array, ...]:
    """Per token: ``(lse, target logit, sum of live logits)`` in float32, one block of
    the vocabulary at a time (online log-sum-exp)."""
    n, acc = args[0].shape[0], acc_dtype(args[0])
    lowest = np.finfo(acc).min
    Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array]

    def body(c: jax.Array, carry: Carry) -> Carry:
        m, s, target, total = carry
        block = _Block(args, c, size)
        logits = jnp.where(block.live, block.logits, lowest)
        m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(logits, axis=1)))
        e = jnp.where(block.live, jnp.exp(logits - m_new[:, None]), 0.0)
        s = s * jnp.exp(m - m_new) + jnp.sum(e, axis=1)
        target = target + jnp.sum(jnp.where(block.hit, logits, 0.0), axis=1)
        if smoothing:
            total = total + jnp.sum(jnp.where(block.live, logits, 0.0), axis=1)
        return m_new, s, target, total

    zeros = jnp.zeros((n,), acc)
    init = (jnp.full((n,), lowest, acc), zeros, zeros, zeros)
    m, s, target, total = lax.fori_loop(0, _blocks(args, size), body, init)
    lse = m + jnp.log(jnp.where(s == 0, 1.0, s))
    return lse, target, total


Terms = tuple[Maybe, Maybe]


def _per_token(args: Inputs, static: Static) -> tuple[jax.Array, jax.Array, Terms]:
    """The loss per token (float32), ``lse``, and ``d loss / d eps`` and ``d loss / d z``
    per token (``None`` for an option that is off)."""
    size, smoothing, _ = static
    lse, target, total = _forward(args, size, smoothing)
    eps, z = options(args, static[1:])
    count = _count(args)
    loss = loss_terms(lse, target, total, args[5], count, eps, z)
    d_eps, d_z = option_terms(lse, target, total, args[5], count)
    return loss, lse, (d_eps if static[1] else None, d_z if static[2] else None)


def _option_grads(terms: Terms, g: jax.Array) -> Terms:
    """The cotangents of ``eps`` and ``z``: ``sum_tokens g * d loss / d option``."""
    return tuple(  # type: ignore[return-value]
        None if t is None else jnp.sum(t * g.astype(t.dtype)) for t in terms
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _per_token_vjp(args: Inputs, static: Static) -> jax.Array:
    return _per_token(args, static)[0]


@allow_rank_promotion
def _fwd(args: Inputs, static: Static) -> tuple[jax.Array, tuple[Inputs, jax.Array, Terms]]:
    loss, lse, terms = _per_token(args, static)
    # Kept: the inputs and lse per token (and, for a smoothing or z-loss that is not a
    # concrete 0, the loss's derivative in it); the logits are recomputed block by block.
    return loss, (args, lse, terms)


@allow_rank_promotion
def _bwd(
    static: Static, residuals: tuple[Inputs, jax.Array, Terms], g: jax.Array
) -> tuple[tuple[jax.Array | None, ...]]:
    # The chain rule through logits = h W + b gives the three products per block; the
    # loss is linear in eps and z, with the kept per-token derivatives.
    args, lse, terms = residuals
    h, weight, bias = args[:3]
    size = static[0]
    coef = coefficients(g, lse, args[5], *options(args, static[1:]))
    count, acc = _count(args), acc_dtype(h)
    Carry = tuple[jax.Array, jax.Array, jax.Array | None]

    def body(c: jax.Array, carry: Carry) -> Carry:
        dh, dw, db = carry
        block = _Block(args, c, size)
        grad = dlogits(block.logits, block.live, block.hit, lse, coef, count)
        dh = dh + jnp.matmul(grad.astype(weight.dtype), block.w.T, preferred_element_type=acc)
        # A block's columns of dW and db are complete in one step (no sum over blocks), so
        # they are written in weight's dtype; the last block keeps the columns an earlier
        # block wrote.
        dw_c = jnp.matmul(h.T, grad.astype(h.dtype), preferred_element_type=acc)
        dw = _write_fresh(dw, dw_c.astype(dw.dtype), block, axis=1)
        if db is not None:
            db = _write_fresh(db, jnp.sum(grad, axis=0).astype(db.dtype), block, axis=0)
        return dh, dw, db

    init = (
        jnp.zeros(h.shape, acc),
        jnp.zeros(weight.shape, weight.dtype),
        None if bias is None else jnp.zeros(bias.shape, bias.dtype),
    )
    dh, dw, db = lax.fori_loop(0, _blocks(args, size), body, init)
    d_eps, d_z = _option_grads(terms, g)
    return ((dh.astype(h.dtype), dw, db, None, None, None, d_eps, d_z),)


def _write_fresh(full: jax.Array, part: jax.Array, block: _Block, axis: int) -> jax.Array:
    """``full`` with the block's fresh columns along ``axis`` replaced by ``part``'s."""
    old = lax.dynamic_slice_in_dim(full, block.start, part.shape[axis], axis)
    fresh = block.fresh if axis == 0 else block.fresh[None, :]
    return lax.dynamic_update_slice_in_dim(full, jnp.where(fresh, part, old), block.start, axis)


_per_token_vjp.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _per_token_jvp(args: Inputs, static: Static) -> jax.Array:
    return _per_token(args, static)[0]


@_per_token_jvp.defjvp
@allow_rank_promotion
def _jvp_rule(
    static: Static, primal_args: tuple[Inputs], tangent_args: tuple[Inputs]
) -> tuple[jax.Array, jax.Array]:
    # loss_dot = sum_j G_j logits_dot_j, logits_dot = h_dot W + h W_dot + b_dot, one block
    # at a time (G with g = 1).
    (primals,), (tangents,) = primal_args, tangent_args
    h, (h_dot, w_dot, b_dot) = primals[0], tangents[:3]
    size = static[0]
    loss, lse, terms = _per_token(primals, static)
    coef = coefficients(jnp.ones_like(lse), lse, primals[5], *options(primals, static[1:]))
    count, acc = _count(primals), acc_dtype(h)

    def body(c: jax.Array, total: jax.Array) -> jax.Array:
        block = _Block(primals, c, size)
        grad = dlogits(block.logits, block.live, block.hit, lse, coef, count)
        wd = take(w_dot, block.start, size, 1)
        dot = jnp.matmul(h_dot, block.w, preferred_element_type=acc)
        dot = dot + jnp.matmul(h, wd, preferred_element_type=acc)
        if b_dot is not None:
            dot = dot + lax.dynamic_slice_in_dim(b_dot, block.start, size).astype(acc)
        return total + jnp.sum(grad * dot, axis=1)

    loss_dot = lax.fori_loop(0, _blocks(primals, size), body, jnp.zeros_like(lse))
    for term, tangent in zip(terms, tangents[6:], strict=True):
        if term is not None:
            loss_dot = loss_dot + term * tangent.astype(term.dtype)
    return loss, loss_dot


# Chosen on docs/loss_benchmarks.md: at 8192 tokens x 32768 vocabulary the fused loss's XLA
# temporaries are under 1/16 of optax's on materialised logits, with either reduction and
# in float32 and half precision. reduction='none': vocabulary columns per block (the
# block's float32 logits and gradient dominate; half precision also keeps a half-precision
# copy of the gradient). 'mean'/'sum': logits elements per chunk of tokens (a chunk's
# float32 logits and gradient, next to the float32 dW every chunk adds to, which half
# precision keeps besides its output); larger chunks make fewer, larger products.
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_CHUNK_SIZE_HALF = 512
DEFAULT_CHUNK_ELEMENTS = 2**23
DEFAULT_CHUNK_ELEMENTS_HALF = 2**22


def _chunk(
    chunk_size: int | None, dtype: jnp.dtype, shape: tuple[int, int], whole: bool
) -> int:
    """The block size along the walked axis: vocabulary columns per block, or with
    ``whole`` rows (tokens) per chunk; ``shape`` is ``(tokens, vocab)``."""
    tokens, vocab = shape
    half = dtype.itemsize < 4
    if chunk_size is not None:
        size = checks.positive_int(chunk_size, "chunk_size")
    elif whole:
        elements = DEFAULT_CHUNK_ELEMENTS_HALF if half else DEFAULT_CHUNK_ELEMENTS
        size = max(1, elements // vocab)
    else:
        size = DEFAULT_CHUNK_SIZE_HALF if half else DEFAULT_CHUNK_SIZE
    return max(1, min(size, tokens if whole else vocab))


def _check_arrays(
    hidden: ArrayLike, weight: ArrayLike, bias: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    h = checks.as_float_array(hidden, "hidden")
    w = checks.as_float_array(weight, "weight")
    if h.ndim < 1 or w.ndim != 2 or w.shape[0] != h.shape[-1]:
        raise ValueError(
            f"`weight` must have shape (hidden, vocab) = ({h.shape[-1] if h.ndim else '?'}, "
            f"vocab) for `hidden` of shape {h.shape}, got {w.shape}; pass `weight.T` if "
            "it is stored (vocab, hidden), as a tied embedding is."
        )
    if bias is None:
        return h, w, None
    b = checks.as_float_array(bias, "bias")
    if b.shape != (w.shape[1],):
        raise ValueError(f"`bias` must have shape ({w.shape[1]},), got {b.shape}.")
    return h, w, b


@allow_rank_promotion
def linear_softmax_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Cross-entropy of ``softmax(hidden @ weight + bias)``, never forming the
    ``(tokens, vocab)`` logits (Wijmans et al., ICLR 2025, "Cut Your Losses in
    Large-Vocabulary Language Models").

    Equal, to float32 rounding, to
    ``softmax_cross_entropy(hidden @ weight + bias, labels, ...)`` (then reduced): the same
    loss, options and gradient, ``dlogits = (1 + 2 z lse) softmax - q``, applied a block at
    a time. Peak memory is ``O(tokens x chunk_size)`` (``'none'``) or
    ``O(chunk_size x vocab + hidden x vocab)`` (``'mean'``, ``'sum'``) instead of
    ``O(tokens x vocab)``. A reduced loss costs the three ``tokens x hidden x vocab``
    products of the materialised loss (its gradient is formed in the forward pass, and the
    backward pass scales it); the per-token loss costs four (the backward pass recomputes
    the logits), so reduce here when the loss is a mean or a sum.

    Args:
        hidden: ``(..., hidden)`` features, e.g. ``(batch, length, d_model)``.
        weight: ``(hidden, vocab)`` output projection, the layout of ``hidden @ weight``
            (Flax's ``Dense`` kernel; transpose a tied ``(vocab, hidden)`` embedding).
        labels: integer targets of ``hidden``'s shape without its last axis.
        bias: optional ``(vocab,)`` bias.
        where: optional boolean ``(vocab,)`` mask: ``False`` tokens of the vocabulary are
            left out of the softmax and of the smoothing (a label on one counts as no
            target mass, as in :func:`softmax_cross_entropy`).
        label_smoothing: ``eps`` in ``[0, 1)``, spread over the unmasked vocabulary;
            checked when concrete, taken as it is when traced (under ``jit``, or from a
            schedule), and the loss is differentiable in it.
        z_loss: coefficient ``>= 0`` of PaLM's ``lse^2`` term; as ``label_smoothing``.
        ignore_index: labels equal to it give loss 0 and gradient 0, whatever their hidden
            state holds (NaN and inf included).
        chunk_size: the block size along the walked axis, which need not divide it. With
            ``'none'``: vocabulary columns per block (default 1024, 512 for
            half-precision inputs). With ``'mean'``/``'sum'``: tokens per chunk (default
            ``2**23 // vocab``, ``2**22 // vocab`` for half precision, at least 1).
        reduction: ``'none'`` (the loss per token), ``'mean'`` (over the tokens not
            ignored; 0, with gradient 0, when every token is) or ``'sum'``.

    Returns:
        The loss per token, of ``labels``' shape (``'none'``), or a scalar; in float32 (or
        float64 under x64 for float64 inputs). A label outside ``[0, vocab)`` that is
        not ``ignore_index`` gives NaN, with NaN gradient, for its token (and so for a
        ``'mean'`` or ``'sum'``), never a number; under
        ``jax.experimental.checkify.checkify`` it raises.

    Raises:
        TypeError: non-integer labels, non-boolean ``where``, non-float inputs.
        ValueError: shapes that do not fit together, options out of range, an unknown
            ``reduction``.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"`reduction` must be 'none', 'mean' or 'sum', got {reduction!r}.")
    h, w, b = _check_arrays(hidden, weight, bias)
    vocab = w.shape[1]
    eps, z = check_loss_options(label_smoothing, z_loss, ignore_index)
    labels_ = check_integer_labels(labels, h.shape[:-1]).reshape(-1)
    dtype = jnp.result_type(h.dtype, w.dtype)
    mask = checks.check_where(where, (vocab,))
    mask = jnp.ones((vocab,), bool) if mask is None else jnp.broadcast_to(mask, (vocab,))
    rows = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1]).astype(dtype)
    valid = jnp.ones_like(labels_, bool) if ignore_index is None else labels_ != ignore_index
    # An ignored token's features are replaced before any product reads them; with the
    # whole vocabulary masked no token has a loss.
    h = jnp.where(valid[:, None], h, 0.0)
    valid = valid & jnp.any(mask)
    bad = out_of_range(labels_, vocab, valid, "linear_softmax_cross_entropy")
    out_dtype = arithmetic.compute_dtype(dtype)
    flags = (not is_off(eps), not is_off(z))
    args = (
        h,
        w.astype(dtype),
        b,
        labels_,
        mask,
        valid,
        jnp.asarray(eps, out_dtype),
        jnp.asarray(z, out_dtype),
    )
    size = _chunk(chunk_size, dtype, (h.shape[0], vocab), reduction != "none")
    if reduction == "none":
        op = _per_token_jvp if forward_mode_enabled() else _per_token_vjp
        loss = poison(op(args, (size, *flags)), bad)
        return loss.astype(out_dtype).reshape(rows)
    if h.shape[0] == 0:
        return jnp.zeros((), out_dtype)
    bias_dtype = None if b is None else b.dtype
    total = summed_op(forward_mode_enabled(), args, (size, *flags, dtype, bias_dtype))
    total = poison(total, jnp.any(bad))
    if reduction == "mean":
        total = total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)
    return total.astype(out_dtype)
