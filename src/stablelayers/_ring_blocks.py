"""Ring attention: the sequence split over a mesh axis, keys and values passed round a ring.

Inside ``shard_map``, each of the ``N`` devices on ``axis_name`` holds ``L / N`` queries,
keys and values. Every local block is two equal *chunks* of the global sequence (``2N``
chunks of ``C = L / 2N`` positions in all): chunks ``2d`` and ``2d + 1`` on device ``d``
in the ``"contiguous"`` layout, chunks ``d`` and ``2N - 1 - d`` in the ``"zigzag"`` one.
For ``N`` steps each device runs the chunked online softmax (``_chunked_attention``) of
its two query chunks against the two key chunks it holds, merges the partial outputs by
logsumexp, and passes its keys and values to the next device with ``lax.ppermute``.

Causal attention: a chunk pair is either skipped (every key after every query), causal on
its diagonal (the same chunk), or full, chosen per pair with ``lax.switch``. In the zigzag
layout every device does the same work at every step: with its own keys, two diagonal
pairs and one full pair; with another device's, exactly two full pairs (chunk ``d`` sees
the lower of the other device's chunks exactly when ``2N - 1 - d`` does not see the
upper). In the contiguous layout device ``N - 1`` does ``N`` times device 0's work.

The ``custom_vjp`` keeps the inputs, the output and one logsumexp per row. Its backward
pass rotates again: keys, values and their gradients travel round the ring, each device
adds its queries' share to them (FlashAttention-2's backward with the global logsumexp),
and after ``N`` steps each gradient is back on the device that holds its key.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers import _chunked_attention as ca
from stablelayers import _vma
from stablelayers._rank_promotion import allow_rank_promotion


class RingConfig(NamedTuple):
    """The static part of a call."""

    inner: ca.Config  # non-causal; the diagonal pairs use it with is_causal=True
    axis_name: str
    size: int  # devices on the ring
    chunk: int  # positions per chunk, two chunks per device
    zigzag: bool
    is_causal: bool


def chunk_ids(cfg: RingConfig, device: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Global chunk indices of the two chunks that ``device`` holds."""
    if cfg.zigzag:
        return device, 2 * cfg.size - 1 - device
    return 2 * device, 2 * device + 1


def _lens(lengths: jax.Array, chunk_id: jax.Array, chunk: int) -> jax.Array:
    """Per batch entry, the valid positions of a chunk (global lengths made local)."""
    return jnp.clip(lengths - chunk_id * chunk, 0, chunk).astype(jnp.int32)


def _pair_kind(cfg: RingConfig, qc: jax.Array, kc: jax.Array) -> jax.Array:
    """0: the pair is skipped, 1: full, 2: causal on the diagonal."""
    if not cfg.is_causal:
        return jnp.int32(1)
    return jnp.where(kc > qc, 0, jnp.where(kc == qc, 2, 1)).astype(jnp.int32)


def _diag(cfg: RingConfig) -> ca.Config:
    return cfg.inner._replace(is_causal=True)


def _merge(o, lse, o_p, lse_p, lowest):
    """Two partial softmaxes of the same rows as one, by logsumexp; an empty part (logsumexp
    at ``lowest``) adds nothing, and two empty parts stay empty."""
    top = jnp.maximum(lse, lse_p)
    a, b = jnp.exp(lse - top), jnp.exp(lse_p - top)
    a, b = jnp.where(lse == lowest, 0.0, a), jnp.where(lse_p == lowest, 0.0, b)
    total = a + b
    empty = total == 0
    safe = jnp.where(empty, 1.0, total)
    o = (a[..., None] * o + b[..., None] * o_p) / safe[..., None]
    return o, jnp.where(empty, lowest, top + jnp.log(safe))


def _rotate(cfg: RingConfig, tree):
    perm = [(i, (i + 1) % cfg.size) for i in range(cfg.size)]
    return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis_name, perm), tree)


def _forward(cfg: RingConfig, q, k, v, sink, q_len, kv_len):
    compute = ca._compute(cfg.inner)
    lowest = jnp.finfo(compute).min
    me = lax.axis_index(cfg.axis_name)
    q_ids = chunk_ids(cfg, me)
    q_lens = [_lens(q_len, c, cfg.chunk) for c in q_ids]
    rows = q[0].shape[:-1]
    empty = (jnp.zeros((*rows, v[0].shape[-1]), compute), jnp.full(rows, lowest, compute))
    init = [_vma.match(empty, q, k, v, sink, q_len, kv_len)] * 2

    def pair(qi, kc, k_blk, v_blk):
        args = (q[qi], k_blk, v_blk, None, None, None, q_lens[qi])
        args = (*args, _lens(kv_len, kc, cfg.chunk), None, None)
        branches = (
            lambda: init[0],
            lambda: ca._forward(cfg.inner, *args),
            lambda: ca._forward(_diag(cfg), *args),
        )
        return lax.switch(_pair_kind(cfg, q_ids[qi], kc), branches)

    def step(s, carry):
        k, v, acc = carry
        k_ids = chunk_ids(cfg, (me - s) % cfg.size)
        acc = list(acc)
        for qi in range(2):
            for ki in range(2):
                o_p, lse_p = pair(qi, k_ids[ki], k[ki], v[ki])
                acc[qi] = _merge(*acc[qi], o_p, lse_p, lowest)
        k, v = lax.cond(s + 1 < cfg.size, lambda: _rotate(cfg, (k, v)), lambda: (k, v))
        return k, v, tuple(acc)

    _, _, acc = lax.fori_loop(0, cfg.size, step, (k, v, tuple(init)))
    if sink is not None:
        # The sink is one more entry of each row's normaliser: merged as a part with value 0.
        s = jnp.broadcast_to(sink.astype(compute)[..., None], rows)
        s = jnp.where(s == -jnp.inf, lowest, s)
        acc = tuple(_merge(o, lse, jnp.zeros_like(o), s, lowest) for o, lse in acc)
    return tuple(a[0] for a in acc), tuple(a[1] for a in acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring(cfg: RingConfig, q, k, v, sink, q_len, kv_len):
    """``(out, lse)`` of the local queries in ``_chunked_attention``'s canonical layout,
    each input and output a pair (one per chunk): q ``(B, Hkv, G, C, D)``, k
    ``(B, Hkv, C, D)``, v ``(B, Hkv, C, Dv)``; sink ``(B, Hkv, G)`` or None; lengths
    ``(B,)`` global. Empty rows have output 0 and logsumexp at the lowest float. Chunks
    are kept apart (never concatenated) so that no copy of the local block is made."""
    return _forward(cfg, q, k, v, sink, q_len, kv_len)


@allow_rank_promotion
def _fwd(cfg, q, k, v, sink, q_len, kv_len):
    out, lse = _forward(cfg, q, k, v, sink, q_len, kv_len)
    return (out, lse), (q, k, v, sink, q_len, kv_len, out, lse)


@allow_rank_promotion
def _bwd(cfg, residuals, cotangents):
    # With the global output and logsumexp, each pair's share of dq, dk and dv is
    # FlashAttention-2's backward of that pair alone (p = exp(s - lse) is the global
    # probability, D = rowsum(dO * O) - d_lse the global row term); the shares add up.
    q, k, v, sink, q_len, kv_len, out, lse = residuals
    d_out, d_lse = cotangents
    compute = ca._compute(cfg.inner)
    me = lax.axis_index(cfg.axis_name)
    q_ids = chunk_ids(cfg, me)
    q_lens = [_lens(q_len, c, cfg.chunk) for c in q_ids]

    def pair(qi, kc, k_blk, v_blk):
        lens = (q_lens[qi], _lens(kv_len, kc, cfg.chunk))
        res = (q[qi], k_blk, v_blk, None, None, None, *lens, None, None, out[qi], lse[qi])
        cot = (d_out[qi], d_lse[qi])

        def skip():
            zeros = tuple(jnp.zeros(x.shape, x.dtype) for x in (q[qi], k_blk, v_blk))
            return _vma.match(zeros, *res, *cot)

        def full():
            return ca._backward(cfg.inner, res, cot)[:3]

        def diag():
            return ca._backward(_diag(cfg), res, cot)[:3]

        return lax.switch(_pair_kind(cfg, q_ids[qi], kc), (skip, full, diag))

    def step(s, carry):
        d_q, k, v, d_k, d_v = carry
        k_ids = chunk_ids(cfg, (me - s) % cfg.size)
        d_q, d_k, d_v = list(d_q), list(d_k), list(d_v)
        for qi in range(2):
            for ki in range(2):
                dq_p, dk_p, dv_p = pair(qi, k_ids[ki], k[ki], v[ki])
                d_q[qi] = d_q[qi] + dq_p.astype(compute)
                d_k[ki] = d_k[ki] + dk_p.astype(compute)
                d_v[ki] = d_v[ki] + dv_p.astype(compute)
        # The gradients always move on (after N moves they are home); k and v need not.
        k, v = lax.cond(s + 1 < cfg.size, lambda: _rotate(cfg, (k, v)), lambda: (k, v))
        d_k, d_v = _rotate(cfg, (tuple(d_k), tuple(d_v)))
        return tuple(d_q), k, v, d_k, d_v

    def zeros(xs):
        return tuple(jnp.zeros(x.shape, compute) for x in xs)

    init = (zeros(q), k, v, zeros(k), zeros(v))
    init = _vma.match(init, q, k, v, sink, q_len, kv_len, out, lse, d_out, d_lse)
    d_q, _, _, d_k, d_v = lax.fori_loop(0, cfg.size, step, init)
    d_sink = None
    if sink is not None:
        # d sink = -sum_q p_sink_q * D_q over this device's rows (the sink is one more entry
        # of each row, with no value), summed over the devices that share the sink.
        lowest = jnp.finfo(compute).min
        sink_c = sink.astype(compute)[..., None]
        d_sink = 0.0
        for o, lse_c, do, dl in zip(out, lse, d_out, d_lse, strict=True):
            delta = jnp.sum(do.astype(compute) * o, axis=-1) - dl.astype(compute)
            finite_lse = jnp.where(lse_c == lowest, 0.0, lse_c)
            p_sink = jnp.where(sink_c == -jnp.inf, 0.0, jnp.exp(sink_c - finite_lse))
            d_sink = d_sink + ca._sum_to(-p_sink * delta, (*sink.shape, 1))[..., 0]
        d_sink = _vma.sum_to(d_sink, sink).astype(sink.dtype)

    def cast(xs, like):
        return tuple(x.astype(y.dtype) for x, y in zip(xs, like, strict=True))

    return (cast(d_q, q), cast(d_k, k), cast(d_v, v), d_sink, None, None)


ring.defvjp(_fwd, _bwd)
