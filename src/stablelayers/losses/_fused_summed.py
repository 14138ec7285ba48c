r"""The summed fused cross-entropy (``reduction='mean'`` or ``'sum'``): three
``tokens x hidden x vocab`` products, as many as the materialised loss needs.

The cotangent of a sum is one number, so the gradient can be formed in the forward pass
(as Liger-Kernel and torch's ``F.linear_cross_entropy`` do) and the backward pass only
scales it. The tokens are walked in chunks of ``size`` rows; each chunk's logits
``L = H_c W + b`` ``(size, vocab)`` are formed once, in float32:

* ``lse`` per token exactly (``max + log sum e^{l - max}``), the chunk's summed loss, and
  ``G = (1 + 2 z lse) softmax(L) - q`` (:mod:`stablelayers.losses._fused_terms`);
* ``dH_c = G W^T`` ``(size, hidden)``, ``dW += H_c^T G`` ``(hidden, vocab)``,
  ``db += sum_rows G``, a block of ``VOCAB_BLOCK`` columns at a time, so that no float32
  copy of the whole weight (half-precision inputs) and no second ``(hidden, vocab)``
  product is formed besides the float32 ``dW``.

With a soft-cap ``c`` the chunk's logits are ``c tanh(Z / c)`` of ``Z = H_c W + b`` and
``G`` is multiplied by ``1 - tanh^2(Z / c)`` before the products; a traced cap also sums
``G d(c tanh(Z / c))/dc`` into its derivative.

Residuals: ``dH``, ``dW``, ``db`` in float32 (the sizes of the inputs), nothing of size
``tokens x vocab``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.define_op import define_op
from stablelayers.losses import _fused_terms as terms
from stablelayers.losses._fused_terms import Block, Flags, Inputs, Span

# Columns of the weight per backward product: the float32 temporaries of a block (the
# block of H_c^T G, and the upcast weight block of half-precision inputs) stay a few MiB;
# wider blocks make fewer, larger products.
VOCAB_BLOCK = 8192
VOCAB_BLOCK_HALF = 4096


class Static(NamedTuple):
    """The summed op's static arguments."""

    size: int  # tokens per chunk
    flags: Flags
    dtype: jnp.dtype  # hidden's and weight's
    bias_dtype: jnp.dtype | None


class Grads(NamedTuple):
    """The gradient of the summed loss in the accumulation dtype, kept by the forward
    pass; the options' entries are the loss's derivatives in them."""

    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None
    label_smoothing: jax.Array
    z_loss: jax.Array
    logits_soft_cap: jax.Array | None  # (): None unless the cap is traced


class _Chunk(NamedTuple):
    """One chunk of tokens: its block of logits ``(size, vocab)``, lse, the counted
    tokens no earlier chunk held, summed loss and summed derivatives in the options."""

    rows: Span
    block: Block
    lse: jax.Array
    counted: jax.Array
    missed: jax.Array | None
    loss: jax.Array
    d_smoothing: jax.Array  # d loss / d eps
    d_z_loss: jax.Array  # d loss / d z


def _chunk(inputs: Inputs, c: jax.Array, static: Static) -> _Chunk:
    rows = terms.span(c, static.size, inputs.hidden.shape[0])
    b = terms.block(inputs, rows, None)
    # A row an earlier chunk held counts once.
    counted = rows.fresh & lax.dynamic_slice_in_dim(inputs.counted, rows.start, rows.size)
    missed = inputs.missed
    if missed is not None:
        missed = lax.dynamic_slice_in_dim(missed, rows.start, rows.size)
    lse = terms.exact_lse(b.logits, b.live)
    target = jnp.sum(jnp.where(b.hit, b.logits, 0.0), axis=1)
    total = jnp.zeros_like(lse)
    if static.flags.smoothing:
        total = jnp.sum(jnp.where(b.live, b.logits, 0.0), axis=1)
    count = terms.class_count(inputs)
    loss = jnp.sum(
        terms.loss_terms(
            lse, target, total, counted, count, *terms.options(inputs, static.flags), missed
        )
    )
    # The loss is linear in eps and z: its derivatives in them, summed over the chunk.
    d_eps, d_z = terms.option_terms(lse, target, total, counted, count, missed)
    return _Chunk(rows, b, lse, counted, missed, loss, jnp.sum(d_eps), jnp.sum(d_z))


def _chunk_grad(inputs: Inputs, chunk: _Chunk, static: Static) -> jax.Array:
    """``G`` ``(size, vocab)``: the chunk's rows of ``d(summed loss)/dlogits``."""
    lse, b = chunk.lse, chunk.block
    coef = terms.coefficients(
        jnp.ones_like(lse),
        lse,
        chunk.counted,
        *terms.options(inputs, static.flags),
        chunk.missed,
    )
    return terms.dlogits(b.logits, b.live, b.hit, lse, coef, terms.class_count(inputs))


def _chunks(inputs: Inputs, static: Static) -> int:
    return terms.block_count(inputs.hidden.shape[0], static.size)


class _Products(NamedTuple):
    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None


def _products(
    h_c: jax.Array, weight: jax.Array, grad: jax.Array, dw: jax.Array, db: jax.Array | None
) -> _Products:
    """``(G W^T, dW + H_c^T G, db + sum_rows G)`` for ``G`` ``(size, vocab)``, one block
    of ``VOCAB_BLOCK`` weight columns at a time."""
    vocab, acc = weight.shape[1], dw.dtype
    width = min(VOCAB_BLOCK if weight.dtype.itemsize >= 4 else VOCAB_BLOCK_HALF, vocab)

    def body(j: jax.Array, carry: _Products) -> _Products:
        cols = terms.span(j, width, vocab)
        # The overlapping last block adds zero for the columns already done.
        g = lax.dynamic_slice_in_dim(grad, cols.start, width, 1)
        g = jnp.where(cols.fresh[None, :], g, 0.0)
        w = terms.take(weight, cols.start, width, 1)
        dh = carry.hidden + jnp.matmul(g.astype(w.dtype), w.T, preferred_element_type=acc)
        dw_j = jnp.matmul(h_c.T, g.astype(h_c.dtype), preferred_element_type=acc)
        dw_j = dw_j + lax.dynamic_slice_in_dim(carry.weight, cols.start, width, 1)
        dw = lax.dynamic_update_slice_in_dim(carry.weight, dw_j, cols.start, 1)
        db = carry.bias
        if db is not None:
            db_j = jnp.sum(g, axis=0) + lax.dynamic_slice_in_dim(db, cols.start, width)
            db = lax.dynamic_update_slice_in_dim(db, db_j, cols.start, 0)
        return _Products(dh, dw, db)

    dh0 = jnp.zeros((h_c.shape[0], weight.shape[0]), acc)
    out: _Products = lax.fori_loop(
        0, terms.block_count(vocab, width), body, _Products(dh0, dw, db)
    )
    return out


def summed_loss(inputs: Inputs, static: Static) -> jax.Array:
    """The loss summed over the counted tokens (float32): one product, no gradient."""

    def body(c: jax.Array, total: jax.Array) -> jax.Array:
        return total + _chunk(inputs, c, static).loss

    zero = jnp.zeros((), terms.acc_dtype(inputs.hidden))
    total: jax.Array = lax.fori_loop(0, _chunks(inputs, static), body, zero)
    return total


class _Carry(NamedTuple):
    total: jax.Array
    grads: Grads


def value_and_grads(inputs: Inputs, static: Static) -> tuple[jax.Array, Grads]:
    """The summed loss and its gradient in float32: three products."""
    h, weight, bias = inputs.hidden, inputs.weight, inputs.bias
    acc = terms.acc_dtype(h)

    def body(c: jax.Array, carry: _Carry) -> _Carry:
        grads = carry.grads
        chunk = _chunk(inputs, c, static)
        grad = _chunk_grad(inputs, chunk, static)
        d_cap = grads.logits_soft_cap
        if d_cap is not None:
            d_cap = d_cap + terms.cap_grad(grad, chunk.block)
        dh_c, dw, db = _products(
            chunk.block.hidden,
            weight,
            terms.raw_grad(grad, chunk.block),
            grads.weight,
            grads.bias,
        )
        rows = chunk.rows
        old = lax.dynamic_slice_in_dim(grads.hidden, rows.start, rows.size)
        dh_c = jnp.where(rows.fresh[:, None], dh_c, old)
        dh = lax.dynamic_update_slice_in_dim(grads.hidden, dh_c, rows.start, 0)
        d_eps = grads.label_smoothing + chunk.d_smoothing
        d_z = grads.z_loss + chunk.d_z_loss
        return _Carry(carry.total + chunk.loss, Grads(dh, dw, db, d_eps, d_z, d_cap))

    zero = jnp.zeros((), acc)
    db0 = None if bias is None else jnp.zeros(bias.shape, acc)
    cap0 = zero if static.flags.soft_cap_grad else None
    grads0 = Grads(jnp.zeros(h.shape, acc), jnp.zeros(weight.shape, acc), db0, zero, zero, cap0)
    out = lax.fori_loop(0, _chunks(inputs, static), body, _Carry(zero, grads0))
    return out.total, out.grads


def _fwd(inputs: Inputs, static: Static) -> tuple[jax.Array, Grads]:
    return value_and_grads(inputs, static)


def _bwd(static: Static, grads: Grads, g: jax.Array) -> tuple[Inputs]:
    # The cotangent is one number: the gradient formed in the forward pass, scaled, and
    # rounded to the inputs' dtypes once.
    g = g.astype(grads.hidden.dtype)
    flags = static.flags
    return terms.cotangents(
        (g * grads.hidden).astype(static.dtype),
        (g * grads.weight).astype(static.dtype),
        None if grads.bias is None else (g * grads.bias).astype(static.bias_dtype),
        g * grads.label_smoothing if flags.smoothing else None,
        g * grads.z_loss if flags.z_loss else None,
        None if grads.logits_soft_cap is None else g * grads.logits_soft_cap,
    )


def _jvp(
    static: Static, primals: tuple[Inputs], tangents: tuple[Inputs]
) -> tuple[jax.Array, jax.Array]:
    # loss_dot = <dH, H_dot> + <dW, W_dot> + <db, b_dot> (+ eps_dot d eps + z_dot d z):
    # the gradient and three inner products, so forward mode costs the same three matmuls.
    (inputs,), (dots,) = primals, tangents
    total, grads = value_and_grads(inputs, static)
    pairs = [
        (grads.hidden, dots.hidden),
        (grads.weight, dots.weight),
        (grads.bias, dots.bias),
        (grads.label_smoothing if static.flags.smoothing else None, dots.label_smoothing),
        (grads.z_loss if static.flags.z_loss else None, dots.z_loss),
        (grads.logits_soft_cap, dots.logits_soft_cap),
    ]
    dot = jnp.zeros_like(total)
    for grad, tangent in pairs:
        if grad is not None and tangent is not None:
            dot = dot + jnp.sum(grad * tangent.astype(grad.dtype))
    return total, dot


# The loss of ``inputs`` (``hidden`` ``(tokens, hidden)`` and ``weight`` ``(hidden, vocab)``
# of one dtype) summed over the counted tokens, exact to any order in both modes.
summed_op = define_op(summed_loss, fwd=_fwd, bwd=_bwd, jvp=_jvp, nondiff_argnums=(1,))
