"""Memory-efficient attention: a chunked online softmax with a backward pass that recomputes.

The forward pass walks the keys and values in blocks, keeping a running maximum and
normaliser per query row (the online softmax of Milakov & Gimelshein, as in FlashAttention),
so no ``q_len x kv_len`` array is ever built. The ``custom_vjp`` keeps the inputs, the output
and one float32 logsumexp per query row; the backward pass (FlashAttention-2's) recomputes
each block's probabilities from the logsumexp. Blocks that the causal mask, the window or the
per-batch lengths remove entirely are skipped: the loops' bounds depend on the block index.

Everything here works on a canonical layout prepared by ``_attention``:

* ``q``: ``(B, kv_heads, groups, Lq, D)``, ``k``: ``(B, kv_heads, Lk, D)``,
  ``v``: ``(B, kv_heads, Lk, Dv)``, with ``Lq`` and ``Lk`` padded to whole blocks;
* ``bias`` and ``mask``: 5-D, each dimension either 1 or that of the logits
  ``(B, kv_heads, groups, Lq, Lk)``;
* ``sink``: ``(B or 1, kv_heads or 1, groups or 1)``;
* ``q_len``, ``kv_len``: ``(B,)`` int32, the number of valid queries and keys per batch
  entry (padding, internal or the caller's, lies beyond them).

A query row with no valid key (and no sink) has output exactly 0, logsumexp ``-inf`` (kept
as the lowest finite float inside, so that nothing inside is infinite) and
gradient exactly 0; masked places never reach a sum, so NaN or inf there does no harm.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers import _vma
from stablelayers._rank_promotion import allow_rank_promotion


class Config(NamedTuple):
    """The static part of a call: hashable, passed as a non-differentiable argument."""

    block_q: int
    block_k: int
    scale: float
    is_causal: bool
    window: int | None
    dtype: jnp.dtype  # of the matmul inputs; logits and softmax are float32 or wider
    precision: lax.PrecisionLike
    broadcast_dropout: bool
    dropout: bool
    # jax.nn's right window: key k is masked from query q when k - q > lookahead.
    lookahead: int | None = None


def _compute(cfg: Config):
    return jnp.dtype(jnp.float32) if jnp.finfo(cfg.dtype).bits <= 32 else jnp.dtype(cfg.dtype)


def _slice(x, axis, start, size):
    """``x[..., start:start + size, ...]`` along ``axis``, or ``x`` where that axis is 1."""
    if x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _add_slice(total, axis_starts, part):
    """``total`` with ``part`` added at ``axis_starts`` (a start per axis of size > 1)."""
    starts = [
        jnp.asarray(s if total.shape[a] > 1 else 0, jnp.int32)
        for a, s in enumerate(axis_starts)
    ]
    current = lax.dynamic_slice(total, starts, part.shape)
    return lax.dynamic_update_slice(total, current + part, starts)


def _kv_range(cfg: Config, i, n_k, kv_max, q_max):
    """Key blocks ``[lo, hi)`` that query block ``i`` can see."""
    q_first = i * cfg.block_q
    q_last = q_first + cfg.block_q - 1
    hi = (jnp.minimum(kv_max, q_last + 1) if cfg.is_causal else kv_max) + cfg.block_k - 1
    hi = jnp.minimum(hi // cfg.block_k, n_k)
    lo = jnp.int32(0)
    if cfg.window is not None:
        lo = jnp.maximum(q_first - cfg.window + 1, 0) // cfg.block_k
    hi = jnp.where(q_first < q_max, hi, lo)
    return lo, jnp.maximum(hi, lo)


def _q_range(cfg: Config, j, n_q, q_max, kv_max):
    """Query blocks ``[lo, hi)`` that see key block ``j``."""
    k_first = j * cfg.block_k
    k_last = k_first + cfg.block_k - 1
    lo = k_first // cfg.block_q if cfg.is_causal else jnp.int32(0)
    hi = (q_max + cfg.block_q - 1) // cfg.block_q
    if cfg.window is not None:
        hi = jnp.minimum(hi, (k_last + cfg.window - 1) // cfg.block_q + 1)
    hi = jnp.where(k_first < kv_max, jnp.minimum(hi, n_q), lo)
    return lo, jnp.maximum(hi, lo)


def _block_logits(cfg, i, j, q_blk, k_blk, bias, mask, q_len, kv_len):
    """Scaled logits of block ``(i, j)``, with invalid places (and ``-inf`` logits, which a
    ``-inf`` bias makes) at the lowest finite float and every valid one above it: nothing
    here is infinite unless the input is (``jax.debug_infs`` checks every intermediate in
    eager mode), and ``s > lowest`` tells the valid places."""
    compute = _compute(cfg)
    s = jnp.einsum(
        "bhgqd,bhkd->bhgqk",
        q_blk,
        k_blk,
        precision=cfg.precision,
        preferred_element_type=compute,
    )
    s = s * jnp.asarray(cfg.scale, compute)
    q0, k0 = i * cfg.block_q, j * cfg.block_k
    if bias is not None:
        s = s + _slice(_slice(bias, 3, q0, cfg.block_q), 4, k0, cfg.block_k).astype(compute)

    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (cfg.block_q, 1), 0)
    k_pos = k0 + lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
    valid = (k_pos < kv_len[:, None, None, None, None]) & (
        q_pos < q_len[:, None, None, None, None]
    )
    if cfg.is_causal:
        valid = valid & (k_pos <= q_pos)
    if cfg.window is not None:
        valid = valid & (q_pos - k_pos < cfg.window)
    if cfg.lookahead is not None:
        valid = valid & (k_pos - q_pos <= cfg.lookahead)
    if mask is not None:
        valid = valid & _slice(_slice(mask, 3, q0, cfg.block_q), 4, k0, cfg.block_k)
    valid = valid & (s != -jnp.inf)
    # A +inf logit (from a +inf bias, or q.k overflowing) becomes the largest float: the
    # running max stays finite, so s - max is 0 there and -inf-like elsewhere, and the row's
    # mass is shared among its +inf entries as on the dense path, instead of inf - inf = NaN.
    lowest = jnp.finfo(compute).min
    s = jnp.clip(s, jnp.nextafter(lowest, jnp.zeros((), compute)), jnp.finfo(compute).max)
    return jnp.where(valid, s, lowest)


def _keep(cfg, rng, rate, i, j, shape):
    """The dropout keep mask of block ``(i, j)``, scaled by ``1 / keep_prob``."""
    keep_prob = 1.0 - rate
    if cfg.broadcast_dropout:
        shape = (1, 1, 1, *shape[-2:])
    block_rng = jax.random.fold_in(jax.random.fold_in(rng, i), j)
    keep = jax.random.bernoulli(block_rng, keep_prob, shape)
    return jnp.where(keep, 1.0 / keep_prob, 0.0).astype(_compute(cfg))


def _forward(cfg, q, k, v, bias, mask, sink, q_len, kv_len, rng, rate):
    compute = _compute(cfg)
    batch, kv_heads, groups, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    n_q, n_k = lq // cfg.block_q, lk // cfg.block_k
    row_shape = (batch, kv_heads, groups, cfg.block_q)
    q_max, kv_max = jnp.max(q_len), jnp.max(kv_len)
    lowest = jnp.finfo(compute).min
    if sink is None:
        m0 = jnp.full(row_shape, lowest, compute)
        l0 = jnp.zeros(row_shape, compute)
    else:
        m0 = jnp.broadcast_to(sink.astype(compute)[..., None], row_shape)
        l0 = jnp.where(m0 == -jnp.inf, 0.0, 1.0).astype(compute)

    def query_block(i, carry):
        out, lse = carry
        q_blk = lax.dynamic_slice_in_dim(q, i * cfg.block_q, cfg.block_q, 3)

        def key_block(j, state):
            m, l, acc = state
            k_blk = lax.dynamic_slice_in_dim(k, j * cfg.block_k, cfg.block_k, 2)
            v_blk = lax.dynamic_slice_in_dim(v, j * cfg.block_k, cfg.block_k, 2)
            s = _block_logits(cfg, i, j, q_blk, k_blk, bias, mask, q_len, kv_len)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.where(s > lowest, jnp.exp(s - shift[..., None]), 0.0)
            alpha = jnp.exp(m - shift)
            l = alpha * l + jnp.sum(p, axis=-1)
            if cfg.dropout:
                p = p * _keep(cfg, rng, rate, i, j, p.shape)
            pv = jnp.einsum(
                "bhgqk,bhkd->bhgqd",
                p.astype(cfg.dtype),
                v_blk,
                precision=cfg.precision,
                preferred_element_type=compute,
            )
            return m_new, l, alpha[..., None] * acc + pv

        lo, hi = (x.astype(jnp.int32) for x in _kv_range(cfg, i, n_k, kv_max, q_max))
        acc0 = jnp.zeros((*row_shape, dv), compute)
        init = _vma.match((m0, l0, acc0), q, k, v, sink, q_len, kv_len)
        m, l, acc = lax.fori_loop(lo, hi, key_block, init)
        empty = l == 0
        o_blk = acc / jnp.where(empty, 1.0, l)[..., None]
        # An empty row's logsumexp is -inf; it is kept as the lowest float (nothing inside
        # is infinite), and the caller turns it into -inf where it returns it.
        lse_blk = jnp.where(empty, lowest, m + jnp.log(jnp.where(empty, 1.0, l)))
        out = lax.dynamic_update_slice_in_dim(out, o_blk, i * cfg.block_q, 3)
        lse = lax.dynamic_update_slice_in_dim(lse, lse_blk, i * cfg.block_q, 3)
        return out, lse

    out = jnp.zeros((batch, kv_heads, groups, lq, dv), compute)
    # Every query block writes its rows (an empty one -inf, as the output must say).
    lse = jnp.zeros((batch, kv_heads, groups, lq), compute)
    return lax.fori_loop(
        0, n_q, query_block, _vma.match((out, lse), q, k, v, sink, q_len, kv_len)
    )


@allow_rank_promotion
def _backward(cfg, residuals, cotangents):
    q, k, v, bias, mask, sink, q_len, kv_len, rng, rate, out, lse = residuals
    d_out, d_lse = cotangents
    compute = _compute(cfg)
    lq, lk = q.shape[3], k.shape[2]
    n_q, n_k = lq // cfg.block_q, lk // cfg.block_k
    q_max, kv_max = jnp.max(q_len), jnp.max(kv_len)
    d_out = d_out.astype(compute)
    # D = rowsum(dO * O): the softmax backward's row term; a logsumexp cotangent enters as
    # d s_qk += p_qk * d_lse_q, i.e. with the opposite sign.
    delta = jnp.sum(d_out * out, axis=-1) - d_lse.astype(compute)
    finite_lse = jnp.where(lse == jnp.finfo(compute).min, 0.0, lse)
    d_out_mm = d_out.astype(cfg.dtype)
    scale = jnp.asarray(cfg.scale, compute)

    def key_block(j, carry):
        d_q, d_k, d_v, d_bias = carry
        k_blk = lax.dynamic_slice_in_dim(k, j * cfg.block_k, cfg.block_k, 2)
        v_blk = lax.dynamic_slice_in_dim(v, j * cfg.block_k, cfg.block_k, 2)

        def query_block(i, state):
            d_q, dk_blk, dv_blk, d_bias = state
            q0 = i * cfg.block_q
            q_blk = lax.dynamic_slice_in_dim(q, q0, cfg.block_q, 3)
            do_blk = lax.dynamic_slice_in_dim(d_out_mm, q0, cfg.block_q, 3)
            lse_blk = lax.dynamic_slice_in_dim(finite_lse, q0, cfg.block_q, 3)
            delta_blk = lax.dynamic_slice_in_dim(delta, q0, cfg.block_q, 3)
            s = _block_logits(cfg, i, j, q_blk, k_blk, bias, mask, q_len, kv_len)
            valid = s > jnp.finfo(compute).min
            p = jnp.where(valid, jnp.exp(s - lse_blk[..., None]), 0.0)
            dp = jnp.einsum(
                "bhgqd,bhkd->bhgqk",
                do_blk,
                v_blk,
                precision=cfg.precision,
                preferred_element_type=compute,
            )
            p_used = p
            if cfg.dropout:
                keep = _keep(cfg, rng, rate, i, j, p.shape)
                p_used = p * keep
                dp = dp * keep
            # dV and dK are accumulated transposed, (d, k): the block's probabilities and
            # dS are then the right-hand operands in their own layout, where (k, d) would
            # make XLA write a transposed copy of each (or recompute them).
            dv_blk = dv_blk + jnp.einsum(
                "bhgqd,bhgqk->bhdk",
                do_blk,
                p_used.astype(cfg.dtype),
                precision=cfg.precision,
                preferred_element_type=compute,
            )
            # Exactly 0 where p is: a masked place or an empty row passes nothing on.
            ds = jnp.where(p == 0, 0.0, p * (dp - delta_blk[..., None]))
            if d_bias is not None:
                part = _sum_to(ds, bias.shape)
                d_bias = _add_slice(d_bias, (0, 0, 0, q0, j * cfg.block_k), part)
            ds_mm = ds.astype(cfg.dtype)
            dq_part = jnp.einsum(
                "bhgqk,bhkd->bhgqd",
                ds_mm,
                k_blk,
                precision=cfg.precision,
                preferred_element_type=compute,
            )
            d_q = _add_slice(d_q, (0, 0, 0, q0, 0), dq_part * scale)
            dk_blk = dk_blk + jnp.einsum(
                "bhgqd,bhgqk->bhdk",
                q_blk,
                ds_mm,
                precision=cfg.precision,
                preferred_element_type=compute,
            )
            return d_q, dk_blk, dv_blk, d_bias

        lo, hi = (x.astype(jnp.int32) for x in _q_range(cfg, j, n_q, q_max, kv_max))
        dk0 = jnp.zeros(jnp.swapaxes(k_blk, 2, 3).shape, compute)
        dv0 = jnp.zeros(jnp.swapaxes(v_blk, 2, 3).shape, compute)
        d_q, dk_blk, dv_blk, d_bias = lax.fori_loop(
            lo, hi, query_block, _vma.match((d_q, dk0, dv0, d_bias), q, k, v, d_out, lse, sink)
        )
        dk_blk, dv_blk = jnp.swapaxes(dk_blk, 2, 3), jnp.swapaxes(dv_blk, 2, 3)
        d_k = lax.dynamic_update_slice_in_dim(d_k, dk_blk * scale, j * cfg.block_k, 2)
        d_v = lax.dynamic_update_slice_in_dim(d_v, dv_blk, j * cfg.block_k, 2)
        return d_q, d_k, d_v, d_bias

    d_bias0 = None if bias is None else jnp.zeros(bias.shape, compute)
    init = (
        jnp.zeros(q.shape, compute),
        jnp.zeros(k.shape, compute),
        jnp.zeros(v.shape, compute),
        d_bias0,
    )
    init = _vma.match(init, q, k, v, d_out, lse, sink, q_len, kv_len)
    d_q, d_k, d_v, d_bias = lax.fori_loop(0, n_k, key_block, init)
    d_sink = None
    if sink is not None:
        # The sink is one more entry of each row, with p_sink = exp(sink - lse), no value,
        # and the row term as its only cotangent: d sink = -sum_q p_sink_q * D_q.
        sink_c = sink.astype(compute)[..., None]
        p_sink = jnp.where(sink_c == -jnp.inf, 0.0, jnp.exp(sink_c - finite_lse))
        d_sink = _sum_to(-p_sink * delta, (*sink.shape, 1))[..., 0].astype(sink.dtype)
    return (
        d_q.astype(q.dtype),
        d_k.astype(k.dtype),
        d_v.astype(v.dtype),
        None if bias is None else d_bias.astype(bias.dtype),
        None,
        d_sink,
        None,
        None,
        None,
        None,
    )


def _sum_to(t, shape):
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and t.shape[a] != 1)
    return jnp.sum(t, axis=axes, keepdims=True) if axes else t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_attention(cfg, q, k, v, bias, mask, sink, q_len, kv_len, rng, rate):
    """Return ``(out, lse)`` in the canonical layout: out ``(B, Hkv, G, Lq, Dv)`` in the
    compute dtype, lse ``(B, Hkv, G, Lq)``; see the module docstring."""
    return _forward(cfg, q, k, v, bias, mask, sink, q_len, kv_len, rng, rate)


@allow_rank_promotion
def _fwd(cfg, q, k, v, bias, mask, sink, q_len, kv_len, rng, rate):
    out, lse = _forward(cfg, q, k, v, bias, mask, sink, q_len, kv_len, rng, rate)
    return (out, lse), (q, k, v, bias, mask, sink, q_len, kv_len, rng, rate, out, lse)


chunked_attention.defvjp(_fwd, _backward)
