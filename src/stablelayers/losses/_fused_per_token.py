r"""The per-token fused cross-entropy (``reduction='none'``) and its rules, one block of
``size`` vocabulary columns at a time.

* value: each block's logits feed an online log-sum-exp (``m' = max(m, max l)``,
  ``s' = s e^{m - m'} + sum e^{l - m'}``; Milakov & Gimelshein, 2018) and pick out the
  target logit; only ``lse`` per token is kept.
* reverse mode: each block's logits are recomputed, ``G = g ((1 + 2 z lse) e^{l - lse} - q)``
  formed for the block alone, and ``dh += G W_c^T``, ``dW_c = h^T G``, ``db_c = sum G``.
* forward mode: ``loss_dot = sum_j G_j logits_dot_j`` (``g = 1``), a block at a time.
* soft-cap ``c``: the blocks' logits are ``c tanh(z / c)`` of ``z = h W_c + b_c``, and
  ``G`` is multiplied by ``1 - tanh^2(z / c)`` before the products (the logits' tangent
  likewise); a traced cap also gets ``sum g G d(c tanh(z / c))/dc``.

So the largest temporaries are ``(tokens, size)``: four ``tokens x hidden x vocab``
products with the backward pass, one more than the materialised loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stablelayers._core.define_op import define_op
from stablelayers.losses import _vocab_shards
from stablelayers.losses._fused_terms import (
    Flags,
    Inputs,
    Span,
    acc_dtype,
    block,
    block_count,
    cap_grad,
    cap_tangent,
    coefficients,
    cotangents,
    dlogits,
    loss_terms,
    option_terms,
    options,
    raw_grad,
    span,
    take,
)


class Static(NamedTuple):
    """The per-token op's static arguments."""

    size: int  # vocabulary columns per block
    flags: Flags
    # The mesh axis the vocabulary is split over (inside shard_map), or None: one device.
    # Each device walks its own columns; see _vocab_shards.
    axis_name: str | None = None


class Terms(NamedTuple):
    """``d loss / d eps`` and ``d loss / d z`` per token, ``None`` for an option that is
    off (the loss is linear in both)."""

    smoothing: jax.Array | None
    z_loss: jax.Array | None


class _Carry(NamedTuple):
    m: jax.Array  # running max
    s: jax.Array  # running sum of e^{l - m}
    target: jax.Array  # the label's logit
    total: jax.Array  # sum of live logits (label smoothing)


def _columns(inputs: Inputs, c: jax.Array, size: int) -> Span:
    return span(c, size, inputs.weight.shape[1])


def _blocks(inputs: Inputs, size: int) -> int:
    return block_count(inputs.weight.shape[1], size)


def _forward(inputs: Inputs, static: Static) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per token: ``(lse, target logit, sum of live logits)`` in float32, one block of
    the vocabulary at a time (online log-sum-exp)."""
    n, acc = inputs.hidden.shape[0], acc_dtype(inputs.hidden)
    lowest = np.finfo(acc).min

    def body(c: jax.Array, carry: _Carry) -> _Carry:
        b = block(inputs, None, _columns(inputs, c, static.size))
        logits = jnp.where(b.live, b.logits, lowest)
        m = jnp.maximum(carry.m, lax.stop_gradient(jnp.max(logits, axis=1)))
        e = jnp.where(b.live, jnp.exp(logits - m[:, None]), 0.0)
        s = carry.s * jnp.exp(carry.m - m) + jnp.sum(e, axis=1)
        target = carry.target + jnp.sum(jnp.where(b.hit, logits, 0.0), axis=1)
        total = carry.total
        if static.flags.smoothing:
            total = total + jnp.sum(jnp.where(b.live, logits, 0.0), axis=1)
        return _Carry(m, s, target, total)

    zeros = jnp.zeros((n,), acc)
    init = _Carry(jnp.full((n,), lowest, acc), zeros, zeros, zeros)
    init = _vocab_shards.match(init, inputs.hidden, inputs.weight, inputs.labels)
    out = lax.fori_loop(0, _blocks(inputs, static.size), body, init)
    m, s, target, total = _vocab_shards.combine(
        out.m, out.s, out.target, out.total, static.axis_name
    )
    lse = m + jnp.log(jnp.where(s == 0, 1.0, s))
    return lse, target, total


def _per_token(inputs: Inputs, static: Static) -> tuple[jax.Array, jax.Array, Terms]:
    """The loss per token (float32), ``lse``, and the loss's derivatives in the options."""
    lse, target, total = _forward(inputs, static)
    count = _count(inputs, static)
    eps, z = options(inputs, static.flags)
    loss = loss_terms(lse, target, total, inputs.counted, count, eps, z, inputs.missed)
    d_eps, d_z = option_terms(lse, target, total, inputs.counted, count, inputs.missed)
    flags = static.flags
    return loss, lse, Terms(d_eps if flags.smoothing else None, d_z if flags.z_loss else None)


def _primal(inputs: Inputs, static: Static) -> jax.Array:
    loss, _, _ = _per_token(inputs, static)
    return loss


class _Residuals(NamedTuple):
    # The inputs and lse per token (and, for a smoothing or z-loss that is not a concrete
    # 0, the loss's derivative in it); the logits are recomputed block by block.
    inputs: Inputs
    lse: jax.Array
    terms: Terms


def _fwd(inputs: Inputs, static: Static) -> tuple[jax.Array, _Residuals]:
    loss, lse, terms = _per_token(inputs, static)
    return loss, _Residuals(inputs, lse, terms)


def _option_grad(term: jax.Array | None, g: jax.Array) -> jax.Array | None:
    """An option's cotangent: ``sum_tokens g * d loss / d option``."""
    return None if term is None else jnp.sum(term * g.astype(term.dtype))


class _Grads(NamedTuple):
    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None
    soft_cap: jax.Array | None  # (): the loss's derivative in a traced cap


def _bwd(static: Static, residuals: _Residuals, g: jax.Array) -> tuple[Inputs]:
    # The chain rule through logits = h W + b gives the three products per block; the
    # loss is linear in eps and z, with the kept per-token derivatives.
    inputs, lse, terms = residuals
    h, weight, bias = inputs.hidden, inputs.weight, inputs.bias
    g, g_whole = _vocab_shards.loss_cotangent(g, weight, static.axis_name)
    coef = coefficients(g, lse, inputs.counted, *options(inputs, static.flags), inputs.missed)
    count, acc = _count(inputs, static), acc_dtype(h)

    def body(c: jax.Array, carry: _Grads) -> _Grads:
        cols = _columns(inputs, c, static.size)
        b = block(inputs, None, cols)
        grad_capped = dlogits(b.logits, b.live, b.hit, lse, coef, count)
        d_cap = carry.soft_cap
        if d_cap is not None:
            d_cap = d_cap + cap_grad(grad_capped, b)
        grad = raw_grad(grad_capped, b)
        dh = carry.hidden + jnp.matmul(
            grad.astype(weight.dtype), b.weight.T, preferred_element_type=acc
        )
        # A block's columns of dW and db are complete in one step (no sum over blocks), so
        # they are written in weight's dtype; the last block keeps the columns an earlier
        # block wrote.
        dw_c = jnp.matmul(h.T, grad.astype(h.dtype), preferred_element_type=acc)
        dw = _write_fresh(carry.weight, dw_c.astype(weight.dtype), cols, axis=1)
        db = carry.bias
        if db is not None:
            db = _write_fresh(db, jnp.sum(grad, axis=0).astype(db.dtype), cols, axis=0)
        return _Grads(dh, dw, db, d_cap)

    init = _Grads(
        jnp.zeros(h.shape, acc),
        jnp.zeros(weight.shape, weight.dtype),
        None if bias is None else jnp.zeros(bias.shape, bias.dtype),
        jnp.zeros((), acc) if static.flags.soft_cap_grad else None,
    )
    init = _vocab_shards.match(init, h, weight, g, lse)
    grads = lax.fori_loop(0, _blocks(inputs, static.size), body, init)
    # Inside shard_map each device holds a share of every cotangent of an input that it
    # does not vary along (dh over the vocabulary axis: summed here, once; dW over a data
    # axis); a no-op outside shard_map.
    like = _vocab_shards.like
    return cotangents(
        like(grads.hidden.astype(h.dtype), h),
        like(grads.weight, weight),
        None if grads.bias is None else like(grads.bias, bias),
        like(_option_grad(terms.smoothing, g_whole), inputs.label_smoothing),
        like(_option_grad(terms.z_loss, g_whole), inputs.z_loss),
        like(grads.soft_cap, inputs.logits_soft_cap),
    )


def _count(inputs: Inputs, static: Static) -> jax.Array:
    """``K``, the live classes of the whole vocabulary (over every shard)."""
    return _vocab_shards.live_classes(inputs, static.axis_name)


def _write_fresh(full: jax.Array, part: jax.Array, cols: Span, axis: int) -> jax.Array:
    """``full`` with the block's fresh columns along ``axis`` replaced by ``part``'s."""
    old = lax.dynamic_slice_in_dim(full, cols.start, part.shape[axis], axis)
    fresh = cols.fresh if axis == 0 else cols.fresh[None, :]
    return lax.dynamic_update_slice_in_dim(full, jnp.where(fresh, part, old), cols.start, axis)


def _jvp(
    static: Static, primals: tuple[Inputs], tangents: tuple[Inputs]
) -> tuple[jax.Array, jax.Array]:
    # loss_dot = sum_j G_j logits_dot_j, logits_dot = h_dot W + h W_dot + b_dot, one block
    # at a time (G with g = 1).
    (inputs,), (dots,) = primals, tangents
    h = inputs.hidden
    loss, lse, terms = _per_token(inputs, static)
    eps, z = options(inputs, static.flags)
    coef = coefficients(jnp.ones_like(lse), lse, inputs.counted, eps, z, inputs.missed)
    count, acc = _count(inputs, static), acc_dtype(h)
    cap_dot = dots.logits_soft_cap if static.flags.soft_cap_grad else None

    def body(c: jax.Array, total: jax.Array) -> jax.Array:
        cols = _columns(inputs, c, static.size)
        b = block(inputs, None, cols)
        grad = dlogits(b.logits, b.live, b.hit, lse, coef, count)
        wd = take(dots.weight, cols.start, static.size, 1)
        dot = jnp.matmul(dots.hidden, b.weight, preferred_element_type=acc)
        dot = dot + jnp.matmul(h, wd, preferred_element_type=acc)
        if dots.bias is not None:
            dot = dot + lax.dynamic_slice_in_dim(dots.bias, cols.start, static.size).astype(acc)
        return total + jnp.sum(grad * cap_tangent(b, dot, cap_dot), axis=1)

    init = _vocab_shards.match(jnp.zeros_like(lse), inputs.weight, dots.hidden, dots.weight)
    loss_dot = lax.fori_loop(0, _blocks(inputs, static.size), body, init)
    if static.axis_name is not None:
        loss_dot = _vocab_shards.psum(loss_dot, static.axis_name)
    for term, tangent in ((terms.smoothing, dots.label_smoothing), (terms.z_loss, dots.z_loss)):
        if term is not None:
            loss_dot = loss_dot + term * tangent.astype(term.dtype)
    return loss, loss_dot


# The loss per token of ``inputs`` (``hidden`` ``(tokens, hidden)`` and ``weight``
# ``(hidden, vocab)`` of one dtype), exact to any order in both modes.
per_token_op = define_op(_primal, fwd=_fwd, bwd=_bwd, jvp=_jvp, nondiff_argnums=(1,))
