r"""linear_softmax_cross_entropy: the loss of ``softmax(hidden @ weight + bias)`` without
ever forming the ``(tokens, vocab)`` logits, forward or backward.

After Wijmans et al. (ICLR 2025, "Cut Your Losses in Large-Vocabulary Language Models"),
in pure JAX. The vocabulary is walked in blocks of ``chunk_size`` columns:

* forward: each block's logits ``l = h W_c + b_c`` feed an online log-sum-exp
  (``m' = max(m, max l)``, ``s' = s e^{m - m'} + sum e^{l - m'}``; Milakov & Gimelshein,
  2018) and pick out the target logit; only ``lse`` per token is kept.
* backward: each block's logits are recomputed, ``G = g ((1 + 2 z lse) e^{l - lse} - q)``
  formed for the block alone, and ``dh += G W_c^T``, ``dW_c = h^T G``, ``db_c = sum G``.

So the largest temporaries are ``(tokens, chunk_size)``, and the price is one more
``tokens x hidden x vocab`` product than the materialised loss (four instead of three).
The last block, when ``chunk_size`` does not divide the vocabulary, is taken from
``vocab - chunk_size`` and its columns already seen are masked: nothing is padded or copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from stablelayers import _checks, _float_arithmetic
from stablelayers._cross_entropy import check_integer_labels, check_loss_options
from stablelayers._switches import forward_mode_enabled
from stablelayers._rank_promotion import allow_rank_promotion


def _block(h, weight, bias, c, size):
    """Block ``c``'s logits in float32 and its column indices; ``fresh`` marks the columns
    no earlier block held (only the last block overlaps)."""
    vocab = weight.shape[1]
    start = jnp.minimum(c * size, vocab - size)
    w = lax.dynamic_slice_in_dim(weight, start, size, axis=1)
    acc = _acc(h)
    logits = jnp.matmul(h, w, preferred_element_type=acc)
    if bias is not None:
        logits = logits + lax.dynamic_slice_in_dim(bias, start, size).astype(acc)
    cols = start + jnp.arange(size)
    return logits, cols, cols >= c * size, start


def _acc(h):
    # Products accumulate, and everything per token is computed, in float32 (float64 for
    # float64 inputs); half precision is read as it is and never rounded back until the end.
    return _float_arithmetic.compute_dtype(h.dtype)


def _blocks(weight, size):
    return -(-weight.shape[1] // size)


def _forward(h, weight, bias, labels, vocab_mask, size, smoothing):
    """Per token: ``(lse, target logit, sum of live logits)`` in float32."""
    n, acc = h.shape[0], _acc(h)
    lowest = jnp.finfo(acc).min

    def body(c, carry):
        m, s, target, total = carry
        logits, cols, fresh, _ = _block(h, weight, bias, c, size)
        live = fresh & vocab_mask[cols]
        logits = jnp.where(live, logits, lowest)
        m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(logits, axis=1)))
        e = jnp.where(live, jnp.exp(logits - m_new[:, None]), 0.0)
        s = s * jnp.exp(m - m_new) + jnp.sum(e, axis=1)
        hit = live & (cols == labels[:, None])
        target = target + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        if smoothing:
            total = total + jnp.sum(jnp.where(live, logits, 0.0), axis=1)
        return m_new, s, target, total

    zeros = jnp.zeros((n,), acc)
    init = (jnp.full((n,), lowest, acc), zeros, zeros, zeros)
    m, s, target, total = lax.fori_loop(0, _blocks(weight, size), body, init)
    lse = m + jnp.log(jnp.where(s == 0, 1.0, s))
    return lse, target, total


def _loss(lse, target, total, valid, count, smoothing, z_loss):
    loss = lse - (1.0 - smoothing) * target
    if smoothing:
        loss = loss - (smoothing / count) * total
    if z_loss:
        loss = loss + z_loss * lse * lse
    return jnp.where(valid, loss, 0.0)


def _block_grad(h, weight, bias, labels, vocab_mask, lse, coef, c, size, smoothing, count):
    """Block ``c``'s ``G = dloss/dlogits`` (float32) for per-token weights ``coef`` =
    ``(g (1 + 2 z lse), g (1 - eps), g eps / K)``, and its start column."""
    logits, cols, fresh, start = _block(h, weight, bias, c, size)
    live = fresh & vocab_mask[cols]
    scale, on_label, spread = coef
    p = jnp.where(live, jnp.exp(jnp.minimum(logits - lse[:, None], 0.0)), 0.0)
    hit = live & (cols == labels[:, None])
    grad = scale[:, None] * p - jnp.where(hit, on_label[:, None], 0.0)
    if smoothing:
        grad = grad - jnp.where(live, spread[:, None] / count, 0.0)
    return grad, start


def _coefficients(g, lse, valid, smoothing, z_loss):
    g = jnp.where(valid, g.astype(lse.dtype), 0.0)
    return g * (1.0 + 2.0 * z_loss * lse), g * (1.0 - smoothing), g * smoothing


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def fused_op(h, weight, bias, labels, vocab_mask, valid, size, smoothing, z_loss):
    """Per-token loss (float32) of ``h (tokens, hidden)``, ``weight (hidden, vocab)``."""
    return _fused_fwd(h, weight, bias, labels, vocab_mask, valid, size, smoothing, z_loss)[0]


@allow_rank_promotion
def _fused_fwd(h, weight, bias, labels, vocab_mask, valid, size, smoothing, z_loss):
    lse, target, total = _forward(h, weight, bias, labels, vocab_mask, size, smoothing)
    count = jnp.maximum(jnp.sum(vocab_mask), 1).astype(_acc(h))
    loss = _loss(lse, target, total, valid, count, smoothing, z_loss)
    # Kept: the inputs and lse per token; the logits are recomputed block by block.
    return loss, (h, weight, bias, labels, vocab_mask, valid, lse)


@allow_rank_promotion
def _fused_bwd(size, smoothing, z_loss, residuals, g):
    # dloss/dlogits = (1 + 2 z lse) softmax - q, q = (1 - eps) onehot + eps / K over the
    # live vocabulary; the chain rule through logits = h W + b gives the three products.
    h, weight, bias, labels, vocab_mask, valid, lse = residuals
    count = jnp.maximum(jnp.sum(vocab_mask), 1).astype(_acc(h))
    coef = _coefficients(g, lse, valid, smoothing, z_loss)
    mm, acc = weight.dtype, _acc(h)

    def body(c, carry):
        dh, dw, db = carry
        grad, start = _block_grad(
            h, weight, bias, labels, vocab_mask, lse, coef, c, size, smoothing, count
        )
        w = lax.dynamic_slice_in_dim(weight, start, size, axis=1)
        dh = dh + jnp.matmul(grad.astype(mm), w.T, preferred_element_type=acc)
        # A block's columns of dW and db are complete in one step (no sum over blocks), so
        # they are written in weight's dtype; the last block keeps the columns an earlier
        # block wrote (``fresh`` is False there).
        fresh = jnp.arange(size) + start >= c * size
        dw_c = jnp.matmul(h.T, grad.astype(h.dtype), preferred_element_type=acc)
        old = lax.dynamic_slice_in_dim(dw, start, size, axis=1)
        dw_c = jnp.where(fresh[None, :], dw_c.astype(dw.dtype), old)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)
        if db is not None:
            old_b = lax.dynamic_slice_in_dim(db, start, size)
            db_c = jnp.where(fresh, jnp.sum(grad, axis=0).astype(db.dtype), old_b)
            db = lax.dynamic_update_slice_in_dim(db, db_c, start, 0)
        return dh, dw, db

    init = (
        jnp.zeros(h.shape, acc),
        jnp.zeros(weight.shape, weight.dtype),
        None if bias is None else jnp.zeros(bias.shape, bias.dtype),
    )
    dh, dw, db = lax.fori_loop(0, _blocks(weight, size), body, init)
    return dh.astype(h.dtype), dw, db, None, None, None


fused_op.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8))
def fused_jvp_op(h, weight, bias, labels, vocab_mask, valid, size, smoothing, z_loss):
    return _fused_fwd(h, weight, bias, labels, vocab_mask, valid, size, smoothing, z_loss)[0]


@fused_jvp_op.defjvp
@allow_rank_promotion
def _fused_jvp_rule(size, smoothing, z_loss, primals, tangents):
    # loss_dot = sum_j G_j logits_dot_j, logits_dot = h_dot W + h W_dot + b_dot, one block
    # at a time (G with g = 1).
    h, weight, bias, labels, vocab_mask, valid = primals
    h_dot, w_dot, b_dot = tangents[:3]
    loss, (*_, lse) = _fused_fwd(
        h, weight, bias, labels, vocab_mask, valid, size, smoothing, z_loss
    )
    count = jnp.maximum(jnp.sum(vocab_mask), 1).astype(_acc(h))
    coef = _coefficients(jnp.ones_like(lse), lse, valid, smoothing, z_loss)

    def body(c, total):
        grad, start = _block_grad(
            h, weight, bias, labels, vocab_mask, lse, coef, c, size, smoothing, count
        )
        w = lax.dynamic_slice_in_dim(weight, start, size, axis=1)
        wd = lax.dynamic_slice_in_dim(w_dot, start, size, axis=1)
        acc = _acc(h)
        dot = jnp.matmul(h_dot, w, preferred_element_type=acc)
        dot = dot + jnp.matmul(h, wd, preferred_element_type=acc)
        if bias is not None:
            dot = dot + lax.dynamic_slice_in_dim(b_dot, start, size).astype(acc)
        return total + jnp.sum(grad * dot, axis=1)

    loss_dot = lax.fori_loop(0, _blocks(weight, size), body, jnp.zeros_like(lse))
    return loss, loss_dot


# Chosen on docs/loss_benchmarks.md: at 8192 tokens x 32768 vocabulary the fused loss's XLA
# temporaries are under 1/16 of optax's on materialised logits (the block's float32
# logits and gradient dominate them), in float32 with 1024 columns and in half precision
# (which also keeps a half-precision copy of the block's gradient) with 512.
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_CHUNK_SIZE_HALF = 512


@allow_rank_promotion
def linear_softmax_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""Per-token cross-entropy of ``softmax(hidden @ weight + bias)``, never forming the
    ``(tokens, vocab)`` logits (Wijmans et al., ICLR 2025, "Cut Your Losses in
    Large-Vocabulary Language Models").

    Equal, to float32 rounding, to
    ``softmax_cross_entropy(hidden @ weight + bias, labels, ...)``: the same loss, options
    and gradient, ``dlogits = (1 + 2 z lse) softmax - q``, applied block by block. Peak
    memory is ``O(tokens x chunk_size)`` instead of ``O(tokens x vocab)``; the backward pass
    recomputes each block's logits, so it costs one more ``tokens x hidden x vocab``
    product than the materialised loss.

    Args:
        hidden: ``(..., hidden)`` features, e.g. ``(batch, length, d_model)``.
        weight: ``(hidden, vocab)`` output projection, the layout of ``hidden @ weight``
            (Flax's ``Dense`` kernel; transpose a tied ``(vocab, hidden)`` embedding).
        labels: integer targets of ``hidden``'s shape without its last axis.
        bias: optional ``(vocab,)`` bias.
        where: optional boolean ``(vocab,)`` mask: ``False`` tokens of the vocabulary are
            left out of the softmax and of the smoothing (a label on one counts as no
            target mass, as in :func:`softmax_cross_entropy`).
        label_smoothing: ``eps`` in ``[0, 1)``, spread over the unmasked vocabulary.
        z_loss: coefficient ``>= 0`` of PaLM's ``lse^2`` term.
        ignore_index: labels equal to it give loss 0 and gradient 0, whatever their hidden
            state holds (NaN and inf included).
        chunk_size: vocabulary columns per block (default 1024, 512 for half-precision
            inputs, capped at the vocabulary);
            need not divide it.

    Returns:
        The loss per token, of ``labels``' shape, in float32 (or float64 under x64 for
        float64 inputs); reduce it with e.g. :func:`mean_over_valid`.

    Raises:
        TypeError: non-integer labels, non-boolean ``where``, non-float inputs.
        ValueError: shapes that do not fit together, or the options out of range.
    """
    h = _checks.as_float_array(hidden, "hidden")
    w = _checks.as_float_array(weight, "weight")
    if h.ndim < 1 or w.ndim != 2 or w.shape[0] != h.shape[-1]:
        raise ValueError(
            f"`weight` must be (hidden, vocab) = ({h.shape[-1:]}, vocab) for `hidden` of "
            f"shape {h.shape}, got {w.shape}; a (vocab, hidden) embedding needs `.T`."
        )
    vocab = w.shape[1]
    check_loss_options(label_smoothing, z_loss, ignore_index)
    labels_ = check_integer_labels(labels, h.shape[:-1])
    dtype = jnp.result_type(h.dtype, w.dtype)
    if chunk_size is None:
        half = jnp.finfo(dtype).bits < 32
        size = DEFAULT_CHUNK_SIZE_HALF if half else DEFAULT_CHUNK_SIZE
    else:
        size = _checks.positive_int(chunk_size, "chunk_size")
    size = min(size, vocab)
    b = None
    if bias is not None:
        b = _checks.as_float_array(bias, "bias")
        if b.shape != (vocab,):
            raise ValueError(f"`bias` must have shape ({vocab},), got {b.shape}.")
    mask = _checks.check_where(where, (vocab,))
    mask = jnp.ones((vocab,), bool) if mask is None else jnp.broadcast_to(mask, (vocab,))
    rows = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1]).astype(dtype)
    labels_ = labels_.reshape(-1)
    valid = (
        labels_ != ignore_index if ignore_index is not None else jnp.ones_like(labels_, bool)
    )
    # An ignored token's features are replaced before any product reads them.
    h = jnp.where(valid[:, None], h, 0.0)
    op = fused_jvp_op if forward_mode_enabled() else fused_op
    loss = op(
        h, w.astype(dtype), b, labels_, mask, valid, size, float(label_smoothing), float(z_loss)
    )
    return loss.astype(_float_arithmetic.compute_dtype(dtype)).reshape(rows)
