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

Residuals: ``dH``, ``dW``, ``db`` in float32 (the sizes of the inputs), nothing of size
``tokens x vocab``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.losses._fused_terms import (
    Inputs,
    acc_dtype,
    block_start,
    coefficients,
    dlogits,
    exact_lse,
    loss_terms,
    option_terms,
    options,
    take,
)

# Columns of the weight per backward product: the float32 temporaries of a block (the
# block of H_c^T G, and the upcast weight block of half-precision inputs) stay a few MiB;
# wider blocks make fewer, larger products.
VOCAB_BLOCK = 8192
VOCAB_BLOCK_HALF = 4096

Grads = tuple[jax.Array, jax.Array, jax.Array | None]
# (dH, dW, db, d eps, d z): the gradient of the summed loss, kept by the forward pass.
AllGrads = tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array]
_Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]
# (tokens per chunk, smoothing on, z-loss on, inputs' dtype, bias dtype).
Static = tuple[int, bool, bool, jnp.dtype, jnp.dtype | None]


class _Chunk:
    """One chunk of ``size`` tokens of ``h`` ``(tokens, hidden)``: its rows, logits
    ``(size, vocab)`` (float32), lse, summed loss and ``G = dloss/dlogits``."""

    def __init__(self, args: Inputs, c: jax.Array, static: Static):
        h, weight, bias, labels, vocab_mask, valid = args[:6]
        size, smoothing = static[:2]
        self.options = options(args, static[1:3])
        self.start, self.fresh = block_start(c, size, h.shape[0])
        self.h = take(h, self.start, size, 0)
        labels = lax.dynamic_slice_in_dim(labels, self.start, size)
        # A row an earlier chunk held counts once.
        rows = self.fresh & lax.dynamic_slice_in_dim(valid, self.start, size)
        acc = acc_dtype(h)
        logits = jnp.matmul(self.h, weight, preferred_element_type=acc)
        if bias is not None:
            logits = logits + bias.astype(acc)[None, :]
        live = vocab_mask[None, :]
        hit = live & (jnp.arange(weight.shape[1])[None, :] == labels[:, None])
        lse = exact_lse(logits, live)
        target = jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        total = jnp.zeros_like(lse)
        if smoothing:
            total = jnp.sum(jnp.where(live, logits, 0.0), axis=1)
        count = jnp.maximum(jnp.sum(vocab_mask), 1).astype(acc)
        self.loss = jnp.sum(loss_terms(lse, target, total, rows, count, *self.options))
        # The loss is linear in eps and z: its derivatives in them, summed over the chunk.
        self.option_grads = jnp.stack(
            [jnp.sum(t) for t in option_terms(lse, target, total, rows, count)]
        )
        self.logits, self.live, self.hit, self.lse, self.rows = logits, live, hit, lse, rows
        self.count = count

    def grad(self) -> jax.Array:
        """``G`` ``(size, vocab)``: the chunk's rows of ``d(summed loss)/dlogits``."""
        coef = coefficients(jnp.ones_like(self.lse), self.lse, self.rows, *self.options)
        return dlogits(self.logits, self.live, self.hit, self.lse, coef, self.count)


def _chunks(h: jax.Array, size: int) -> int:
    return -(-h.shape[0] // size)


def _products(
    h_c: jax.Array, weight: jax.Array, grad: jax.Array, dw: jax.Array, db: jax.Array | None
) -> Grads:
    """``(G W^T, dW + H_c^T G, db + sum_rows G)`` for ``G`` ``(size, vocab)``, one block
    of ``VOCAB_BLOCK`` weight columns at a time."""
    vocab, acc = weight.shape[1], dw.dtype
    block = min(VOCAB_BLOCK if weight.dtype.itemsize >= 4 else VOCAB_BLOCK_HALF, vocab)

    def body(j: jax.Array, carry: Grads) -> Grads:
        dh, dw, db = carry
        start, fresh = block_start(j, block, vocab)
        # The overlapping last block adds zero for the columns already done.
        g = jnp.where(fresh[None, :], lax.dynamic_slice_in_dim(grad, start, block, 1), 0.0)
        w = take(weight, start, block, 1)
        dh = dh + jnp.matmul(g.astype(w.dtype), w.T, preferred_element_type=acc)
        dw_j = jnp.matmul(h_c.T, g.astype(h_c.dtype), preferred_element_type=acc)
        dw_j = dw_j + lax.dynamic_slice_in_dim(dw, start, block, 1)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_j, start, 1)
        if db is not None:
            db_j = jnp.sum(g, axis=0) + lax.dynamic_slice_in_dim(db, start, block)
            db = lax.dynamic_update_slice_in_dim(db, db_j, start, 0)
        return dh, dw, db

    dh0 = jnp.zeros((h_c.shape[0], weight.shape[0]), acc)
    out: Grads = lax.fori_loop(0, -(-vocab // block), body, (dh0, dw, db))
    return out


def summed_loss(args: Inputs, static: Static) -> jax.Array:
    """The loss summed over the ``valid`` tokens (float32): one product, no gradient."""
    h = args[0]

    def body(c: jax.Array, total: jax.Array) -> jax.Array:
        return total + _Chunk(args, c, static).loss

    total: jax.Array = lax.fori_loop(
        0, _chunks(h, static[0]), body, jnp.zeros((), acc_dtype(h))
    )
    return total


def value_and_grads(args: Inputs, static: Static) -> tuple[jax.Array, AllGrads]:
    """The summed loss and its gradients ``(dH, dW, db, d eps, d z)`` in float32: three
    products."""
    h, weight, bias = args[:3]
    size = static[0]
    acc = acc_dtype(h)

    def body(c: jax.Array, carry: _Carry) -> _Carry:
        total, dh, dw, db, d_options = carry
        chunk = _Chunk(args, c, static)
        dh_c, dw, db = _products(chunk.h, weight, chunk.grad(), dw, db)
        old = lax.dynamic_slice_in_dim(dh, chunk.start, size)
        dh_c = jnp.where(chunk.fresh[:, None], dh_c, old)
        dh = lax.dynamic_update_slice_in_dim(dh, dh_c, chunk.start, 0)
        return total + chunk.loss, dh, dw, db, d_options + chunk.option_grads

    db0 = None if bias is None else jnp.zeros(bias.shape, acc)
    zero = jnp.zeros((), acc)
    init = (zero, jnp.zeros(h.shape, acc), jnp.zeros(weight.shape, acc), db0, jnp.zeros(2, acc))
    total, dh, dw, db, d_options = lax.fori_loop(0, _chunks(h, size), body, init)
    return total, (dh, dw, db, d_options[0], d_options[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _summed_vjp(args: Inputs, static: Static) -> jax.Array:
    return summed_loss(args, static)


@allow_rank_promotion
def _fwd(args: Inputs, static: Static) -> tuple[jax.Array, AllGrads]:
    return value_and_grads(args, static)


def _bwd(static: Static, grads: AllGrads, g: jax.Array) -> tuple[tuple[jax.Array | None, ...]]:
    # The cotangent is one number: the gradient formed in the forward pass, scaled, and
    # rounded to the inputs' dtypes once.
    dh, dw, db, d_eps, d_z = grads
    dtype, bias_dtype = static[3:]
    g = g.astype(dh.dtype)
    db_out = None if db is None else (g * db).astype(bias_dtype)
    eps_out = g * d_eps if static[1] else None
    z_out = g * d_z if static[2] else None
    dh_out, dw_out = (g * dh).astype(dtype), (g * dw).astype(dtype)
    return ((dh_out, dw_out, db_out, None, None, None, eps_out, z_out),)


_summed_vjp.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _summed_jvp(args: Inputs, static: Static) -> jax.Array:
    return summed_loss(args, static)


@_summed_jvp.defjvp
@allow_rank_promotion
def _jvp_rule(
    static: Static, primals: tuple[Inputs], tangents: tuple[Inputs]
) -> tuple[jax.Array, jax.Array]:
    # loss_dot = <dH, H_dot> + <dW, W_dot> + <db, b_dot> (+ eps_dot d eps + z_dot d z):
    # the gradient and three inner products, so forward mode costs the same three matmuls.
    total, grads = value_and_grads(primals[0], static)
    on = (True, True, True, static[1], static[2])
    (h_dot, w_dot, b_dot), option_dots = tangents[0][:3], tangents[0][6:]
    dot = jnp.zeros_like(total)
    for used, grad, tangent in zip(on, grads, (h_dot, w_dot, b_dot, *option_dots), strict=True):
        if used and grad is not None and tangent is not None:
            dot = dot + jnp.sum(grad * tangent.astype(grad.dtype))
    return total, dot


def summed_op(forward_mode: bool, args: Inputs, static: Static) -> jax.Array:
    """The summed loss of ``args = (h, weight, bias, labels, vocab_mask, valid, eps, z)``,
    ``h`` ``(tokens, hidden)`` and ``weight`` ``(hidden, vocab)`` of one dtype, with
    ``static = (chunk tokens, smoothing on, z-loss on, inputs' dtype, bias dtype)``: a
    custom_vjp, or under ``forward_mode`` a custom_jvp, both exact to any order."""
    op = _summed_jvp if forward_mode else _summed_vjp
    return op(args, static)
