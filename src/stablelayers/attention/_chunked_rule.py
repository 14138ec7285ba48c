"""Memory-efficient attention: a chunked online softmax with a backward pass that recomputes.

The forward pass walks the keys and values in blocks, keeping a running maximum and
normaliser per query row (the online softmax of Milakov & Gimelshein, as in FlashAttention),
so no ``q_len x kv_len`` array is ever built. The ``custom_vjp`` keeps the inputs, the output
and one float32 logsumexp per query row; the backward pass (FlashAttention-2's) recomputes
each block's probabilities from the logsumexp. Blocks that the causal mask, the window or the
per-batch lengths remove entirely are skipped, and so are those whose queries and keys
share no segment: the loops' bounds depend on the block index.

Everything here works on a canonical layout prepared by ``_api``:

* ``q``: ``(B, kv_heads, groups, Lq, D)``, ``k``: ``(B, kv_heads, Lk, D)``,
  ``v``: ``(B, kv_heads, Lk, Dv)``, with ``Lq`` and ``Lk`` padded to whole blocks;
* ``bias`` and ``mask``: 5-D, each dimension either 1 or that of the logits
  ``(B, kv_heads, groups, Lq, Lk)``;
* ``sink``: ``(B or 1, kv_heads or 1, groups or 1)``;
* ``q_len``, ``kv_len``: ``(B,)`` int32, the number of valid queries and keys per batch
  entry (padding, internal or the caller's, lies beyond them);
* ``q_segments``, ``kv_segments``: ``(B, Lq)`` and ``(B, Lk)`` int32 or None.

A query row with no valid key (and no sink) has output exactly 0, logsumexp ``-inf`` (kept
as the lowest finite float inside, so that nothing inside is infinite) and
gradient exactly 0; masked places never reach a sum, so NaN or inf there does no harm.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core import online_softmax
from stablelayers._core.arithmetic import compute_dtype
from stablelayers._core.checks import sum_to_shape
from stablelayers._core.define_op import define_op
from stablelayers._core.nonfinite import is_neginf
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.attention import _chunked_blocks as cb
from stablelayers.attention import _sharding
from stablelayers.attention._arguments import Inputs
from stablelayers.attention._chunked_blocks import Config as Config
from stablelayers.attention._chunked_blocks import Grads as Grads

# (dq, dk, dv, d_bias) of one key block, dk and dv transposed: (B, Hkv, D, block_k).
_BlockGrads = tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]
# The online softmax's running (max, normaliser, unnormalised output) of a query block.
_Online = tuple[jax.Array, jax.Array, jax.Array]


class Residuals(NamedTuple):
    """What the backward pass keeps: the inputs, the output and the row logsumexps."""

    inputs: Inputs
    out: jax.Array
    lse: jax.Array


def initial_state(
    cfg: Config, q: jax.Array, v: jax.Array, sink: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of rows that have seen no key yet: output 0 and logsumexp at the
    lowest float (empty), or with a sink, the sink's logit: the sink is one more entry of
    each row, with value 0. Shapes ``(B, Hkv, G, Lq, Dv)`` and ``(B, Hkv, G, Lq)``."""
    compute = compute_dtype(cfg.dtype)
    rows = q.shape[:-1]
    lowest = cb.lowest(compute)
    if sink is None:
        lse = jnp.full(rows, lowest, compute)
    else:
        s = sink.astype(compute)[..., None]
        lse = jnp.broadcast_to(jnp.where(is_neginf(s), lowest, s), rows)
    return jnp.zeros((*rows, v.shape[-1]), compute), lse


def forward(
    cfg: Config, x: Inputs, state: tuple[jax.Array, jax.Array] | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of the rows against these keys, continuing the online softmax
    (:mod:`stablelayers._core.online_softmax`) from ``state`` (default
    :func:`initial_state`, from ``x.sink``): per row, running max ``m = lse``, normaliser
    ``l = 1`` (0 if empty) and ``acc = out``; for each key block ``m' = max(m, max_k s)``,
    ``l' = e^{m - m'} l + sum_k e^{s - m'}``, ``acc' = e^{m - m'} acc + e^{s - m'} v``; at
    the end ``out = acc / l``, ``lse = m + log l``. Continuing from a state is the
    logsumexp merge of two partial softmaxes, written over the state in place."""
    q, k, v = x.query, x.key, x.value
    n_q, n_k = q.shape[3] // cfg.block_q, k.shape[2] // cfg.block_k
    q_lengths, kv_lengths = cb.lengths(x)
    q_max, kv_max = jnp.max(q_lengths), jnp.max(kv_lengths)
    lowest = cb.lowest(compute_dtype(cfg.dtype))
    overlap = cb.segment_overlap(cfg, x)

    def query_block(
        i: jax.Array, carry: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        out, lse = carry
        q0 = i * cfg.block_q
        q_blk = lax.dynamic_slice_in_dim(q, q0, cfg.block_q, 3)

        def key_block(j: jax.Array, state: _Online) -> _Online:
            m, l, acc = state
            k_blk = lax.dynamic_slice_in_dim(k, j * cfg.block_k, cfg.block_k, 2)
            v_blk = lax.dynamic_slice_in_dim(v, j * cfg.block_k, cfg.block_k, 2)
            s, _ = cb.block_logits(cfg, x, i, j, q_blk, k_blk)
            m, l, p, alpha = online_softmax.step(m, l, s, lowest)
            if cfg.dropout:
                p = p * cb.keep_mask(cfg, x, i, j, p.shape)
            pv = cb.mm(cfg, "bhgqk,bhkd->bhgqd", p.astype(cfg.dtype), v_blk)
            return m, l, alpha[..., None] * acc + pv

        lo, hi = (b.astype(jnp.int32) for b in cb.kv_range(cfg, x, i, n_k, kv_max, q_max))
        lo, hi = cb.narrow(lo, hi, None if overlap is None else overlap[i])
        m0, l0 = online_softmax.start(lax.dynamic_slice_in_dim(lse, q0, cfg.block_q, 3), lowest)
        acc0 = lax.dynamic_slice_in_dim(out, q0, cfg.block_q, 3)
        init = _sharding.match((m0, l0, acc0), x)
        m, l, acc = lax.fori_loop(lo, hi, key_block, init)
        # An empty row's logsumexp is -inf; it is kept as the lowest float (nothing inside
        # is infinite), and the caller turns it into -inf where it returns it.
        o_blk, lse_blk = online_softmax.finish(m, l, acc, lowest)
        out = lax.dynamic_update_slice_in_dim(out, o_blk, q0, 3)
        lse = lax.dynamic_update_slice_in_dim(lse, lse_blk, q0, 3)
        return out, lse

    if state is None:
        state = initial_state(cfg, q, v, x.sink)
    state = _sharding.match(state, x)
    return cast(tuple[jax.Array, jax.Array], lax.fori_loop(0, n_q, query_block, state))


def row_terms(
    cfg: Config, out: jax.Array, lse: jax.Array, d_out: jax.Array, d_lse: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The backward pass's per-row terms, each ``(B, Hkv, G, Lq)``: the logsumexp with an
    empty row's (the lowest float) made 0, and ``D = rowsum(dO * O) - d_lse``, the softmax
    backward's row term (a logsumexp cotangent enters as ``d s_qk += p_qk d_lse_q``, with
    the opposite sign). Computed once, so that ``out`` is not needed afterwards."""
    compute = compute_dtype(cfg.dtype)
    delta = jnp.sum(d_out.astype(compute) * out, axis=-1) - d_lse.astype(compute)
    return jnp.where(lse == cb.lowest(compute), 0.0, lse), delta


@allow_rank_promotion
def accumulate_grads(
    cfg: Config,
    inputs: Inputs,
    d_out: jax.Array,
    rows: tuple[jax.Array, jax.Array],
    grads: Grads,
) -> Grads:
    """``grads = (dq, dk, dv, d_bias)`` (compute dtype, shapes of ``q, k, v, bias``) plus
    this call's shares: FlashAttention-2's backward, each block's probabilities
    ``p = exp(s - lse)`` recomputed from ``rows = row_terms(...)``, ``dS = p (dP - D)``,
    ``dq += scale dS k``, ``dk += scale dS^T q``, ``dv += p^T dO``. The sums are added
    into ``grads`` in place, so a caller that calls it for several key blocks (the ring)
    holds one set of gradients, not one per call."""
    q, k, v = inputs.query, inputs.key, inputs.value
    finite_lse, delta = rows
    compute = compute_dtype(cfg.dtype)
    n_q, n_k = q.shape[3] // cfg.block_q, k.shape[2] // cfg.block_k
    q_lengths, kv_lengths = cb.lengths(inputs)
    q_max, kv_max = jnp.max(q_lengths), jnp.max(kv_lengths)
    d_out_mm = d_out.astype(cfg.dtype)
    scale = jnp.asarray(cfg.scale, compute)
    overlap = cb.segment_overlap(cfg, inputs)

    def key_block(j: jax.Array, carry: Grads) -> Grads:
        d_q, d_k, d_v, d_bias = carry
        k_blk = lax.dynamic_slice_in_dim(k, j * cfg.block_k, cfg.block_k, 2)
        v_blk = lax.dynamic_slice_in_dim(v, j * cfg.block_k, cfg.block_k, 2)

        def query_block(i: jax.Array, state: _BlockGrads) -> _BlockGrads:
            d_q, dk_blk, dv_blk, d_bias = state
            q0 = i * cfg.block_q
            q_blk = lax.dynamic_slice_in_dim(q, q0, cfg.block_q, 3)
            do_blk = lax.dynamic_slice_in_dim(d_out_mm, q0, cfg.block_q, 3)
            lse_blk = lax.dynamic_slice_in_dim(finite_lse, q0, cfg.block_q, 3)
            delta_blk = lax.dynamic_slice_in_dim(delta, q0, cfg.block_q, 3)
            s, slope = cb.block_logits(cfg, inputs, i, j, q_blk, k_blk)
            valid = s > cb.lowest(compute)
            p = jnp.where(valid, jnp.exp(s - lse_blk[..., None]), 0.0)
            dp = cb.mm(cfg, "bhgqd,bhkd->bhgqk", do_blk, v_blk)
            p_used = p
            if cfg.dropout:
                keep = cb.keep_mask(cfg, inputs, i, j, p.shape)
                p_used = p * keep
                dp = dp * keep
            # dV and dK are accumulated transposed, (d, k): the block's probabilities and
            # dS are then the right-hand operands in their own layout, where (k, d) would
            # make XLA write a transposed copy of each (or recompute them).
            dv_blk = dv_blk + cb.mm(cfg, "bhgqd,bhgqk->bhdk", do_blk, p_used.astype(cfg.dtype))
            # Exactly 0 where p is: a masked place or an empty row passes nothing on.
            ds = jnp.where(p == 0, 0.0, p * (dp - delta_blk[..., None]))
            if d_bias is not None:
                part = sum_to_shape(ds, d_bias.shape)
                d_bias = cb.add_slice(d_bias, (0, 0, 0, q0, j * cfg.block_k), part)
            if slope is not None:
                ds = ds * slope  # through the soft cap, back to the scaled q.k
            ds_mm = ds.astype(cfg.dtype)
            dq_part = cb.mm(cfg, "bhgqk,bhkd->bhgqd", ds_mm, k_blk)
            d_q = cb.add_slice(d_q, (0, 0, 0, q0, 0), dq_part * scale)
            dk_blk = dk_blk + cb.mm(cfg, "bhgqd,bhgqk->bhdk", q_blk, ds_mm)
            return d_q, dk_blk, dv_blk, d_bias

        q_range = cb.q_range(cfg, inputs, j, n_q, q_max, kv_max)
        lo, hi = (b.astype(jnp.int32) for b in q_range)
        lo, hi = cb.narrow(lo, hi, None if overlap is None else overlap[:, j])
        dk0 = jnp.zeros(jnp.swapaxes(k_blk, 2, 3).shape, compute)
        dv0 = jnp.zeros(jnp.swapaxes(v_blk, 2, 3).shape, compute)
        init = _sharding.match((d_q, dk0, dv0, d_bias), q, k, v, d_out, finite_lse)
        d_q, dk_blk, dv_blk, d_bias = lax.fori_loop(lo, hi, query_block, init)
        start = (0, 0, j * cfg.block_k, 0)
        d_k = cb.add_slice(d_k, start, jnp.swapaxes(dk_blk, 2, 3) * scale)
        d_v = cb.add_slice(d_v, start, jnp.swapaxes(dv_blk, 2, 3))
        return Grads(d_q, d_k, d_v, d_bias)

    return cast(Grads, lax.fori_loop(0, n_k, key_block, grads))


def sink_grad(sink: jax.Array, rows: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``d sink = -sum_q p_sink_q D_q``, shape of ``sink``, compute dtype: the sink is one
    more entry of each row, with ``p_sink = exp(sink - lse)``, no value, and the row term
    as its only cotangent."""
    finite_lse, delta = rows
    sink_c = sink.astype(delta.dtype)[..., None]
    p_sink = jnp.where(is_neginf(sink_c), 0.0, jnp.exp(sink_c - finite_lse))
    return sum_to_shape(-p_sink * delta, (*sink.shape, 1))[..., 0]


def _backward(
    cfg: Config, residuals: Residuals, cotangents: tuple[jax.Array, jax.Array]
) -> tuple[Inputs]:
    """The backward rule: the gradients of q, k, v, bias and sink (None for the other
    inputs) in their dtypes, from ``_fwd``'s residuals and ``(d_out, d_lse)``."""
    x, out, lse = residuals
    d_out, d_lse = cotangents
    rows = row_terms(cfg, out, lse, d_out, d_lse)
    compute = compute_dtype(cfg.dtype)
    q, k, v, bias, sink = x.query, x.key, x.value, x.bias, x.sink
    d_q, d_k, d_v = (jnp.zeros(a.shape, compute) for a in (q, k, v))
    d_bias = None if bias is None else jnp.zeros(bias.shape, compute)
    refs = (q, k, v, d_out, lse, sink, x.q_lengths, x.kv_lengths)
    grads = _sharding.match(Grads(d_q, d_k, d_v, d_bias), *refs)
    grads = accumulate_grads(cfg, x, d_out, rows, grads)
    d_bias = None if grads.d_bias is None or bias is None else grads.d_bias.astype(bias.dtype)
    d_sink = None if sink is None else sink_grad(sink, rows).astype(sink.dtype)
    d_x = Inputs(
        grads.d_q.astype(q.dtype),
        grads.d_k.astype(k.dtype),
        grads.d_v.astype(v.dtype),
        d_bias,
        None,
        d_sink,
        None,
        None,
    )
    return (d_x,)


def _primal(cfg: Config, x: Inputs) -> tuple[jax.Array, jax.Array]:
    """Return ``(out, lse)`` in the canonical layout: out ``(B, Hkv, G, Lq, Dv)`` in the
    compute dtype, lse ``(B, Hkv, G, Lq)``; see the module docstring."""
    return forward(cfg, x)


def _fwd(cfg: Config, x: Inputs) -> tuple[tuple[jax.Array, jax.Array], Residuals]:
    """The forward rule: ``_primal(cfg, x)``, with ``x`` and the result kept."""
    out, lse = _primal(cfg, x)
    return (out, lse), Residuals(x, out, lse)


# Reverse mode only: forward mode takes the dense path (``_arguments.use_chunked``).
chunked_attention = define_op(_primal, fwd=_fwd, bwd=_backward, nondiff_argnums=(0,))
