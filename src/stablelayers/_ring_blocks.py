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


def _split(x: jax.Array, axis: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    return lax.slice_in_dim(x, 0, chunk, axis=axis), lax.slice_in_dim(x, chunk, None, axis=axis)


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
    qs = _split(q, 3, cfg.chunk)
    q_lens = [_lens(q_len, c, cfg.chunk) for c in q_ids]
    rows = (*q.shape[:3], cfg.chunk)
    empty = (jnp.zeros((*rows, v.shape[-1]), compute), jnp.full(rows, lowest, compute))
    init = [_vma.match(empty, q, k, v, sink, q_len, kv_len)] * 2

    def pair(qi, kc, k_blk, v_blk):
        lens = (q_lens[qi], _lens(kv_len, kc, cfg.chunk))

        def skip():
            return init[0]

        def full():
            return ca._forward(
                cfg.inner, qs[qi], k_blk, v_blk, None, None, None, *lens, None, None
            )

        def diag():
            return ca._forward(
                _diag(cfg), qs[qi], k_blk, v_blk, None, None, None, *lens, None, None
            )

        return lax.switch(_pair_kind(cfg, q_ids[qi], kc), (skip, full, diag))

    def step(s, carry):
        k, v, acc = carry
        k_ids = chunk_ids(cfg, (me - s) % cfg.size)
        acc = list(acc)
        for qi in range(2):
            for kc, k_blk, v_blk in zip(
                k_ids, _split(k, 2, cfg.chunk), _split(v, 2, cfg.chunk), strict=True
            ):
                o_p, lse_p = pair(qi, kc, k_blk, v_blk)
                acc[qi] = _merge(*acc[qi], o_p, lse_p, lowest)
        k, v = lax.cond(s + 1 < cfg.size, lambda: _rotate(cfg, (k, v)), lambda: (k, v))
        return k, v, tuple(acc)

    _, _, acc = lax.fori_loop(0, cfg.size, step, (k, v, tuple(init)))
    out = jnp.concatenate([acc[0][0], acc[1][0]], axis=3)
    lse = jnp.concatenate([acc[0][1], acc[1][1]], axis=3)
    if sink is not None:
        # The sink is one more entry of each row's normaliser: merged as a part with value 0.
        s = jnp.broadcast_to(sink.astype(compute)[..., None], lse.shape)
        s = jnp.where(s == -jnp.inf, lowest, s)
        out, lse = _merge(out, lse, jnp.zeros_like(out), s, lowest)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring(cfg: RingConfig, q, k, v, sink, q_len, kv_len):
    """``(out, lse)`` of the local queries in ``_chunked_attention``'s canonical layout,
    q ``(B, Hkv, G, 2C, D)``, k ``(B, Hkv, 2C, D)``, v ``(B, Hkv, 2C, Dv)``, sink
    ``(B or 1, Hkv or 1, G or 1)`` or None, lengths ``(B,)`` global; empty rows have
    output 0 and logsumexp at the lowest float."""
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
    qs, outs, lses = (_split(x, 3, cfg.chunk) for x in (q, out, lse))
    d_outs, d_lses = _split(d_out, 3, cfg.chunk), _split(d_lse, 3, cfg.chunk)
    q_lens = [_lens(q_len, c, cfg.chunk) for c in q_ids]

    def pair(qi, kc, k_blk, v_blk):
        lens = (q_lens[qi], _lens(kv_len, kc, cfg.chunk))
        res = (qs[qi], k_blk, v_blk, None, None, None, *lens, None, None, outs[qi], lses[qi])
        cot = (d_outs[qi], d_lses[qi])

        def skip():
            zeros = tuple(jnp.zeros(x.shape, x.dtype) for x in (qs[qi], k_blk, v_blk))
            return _vma.match(zeros, *res, *cot)

        def full():
            return ca._backward(cfg.inner, res, cot)[:3]

        def diag():
            return ca._backward(_diag(cfg), res, cot)[:3]

        return lax.switch(_pair_kind(cfg, q_ids[qi], kc), (skip, full, diag))

    def step(s, carry):
        d_q, k, v, d_k, d_v = carry
        k_ids = chunk_ids(cfg, (me - s) % cfg.size)
        d_q = list(d_q)
        ks, vs = _split(k, 2, cfg.chunk), _split(v, 2, cfg.chunk)
        dks, dvs = list(_split(d_k, 2, cfg.chunk)), list(_split(d_v, 2, cfg.chunk))
        for qi in range(2):
            for ki in range(2):
                dq_p, dk_p, dv_p = pair(qi, k_ids[ki], ks[ki], vs[ki])
                d_q[qi] = d_q[qi] + dq_p.astype(compute)
                dks[ki] = dks[ki] + dk_p.astype(compute)
                dvs[ki] = dvs[ki] + dv_p.astype(compute)
        d_k, d_v = jnp.concatenate(dks, axis=2), jnp.concatenate(dvs, axis=2)
        # The gradients always move on (after N moves they are home); k and v need not.
        k, v = lax.cond(s + 1 < cfg.size, lambda: _rotate(cfg, (k, v)), lambda: (k, v))
        d_k, d_v = _rotate(cfg, (d_k, d_v))
        return tuple(d_q), k, v, d_k, d_v

    zeros = [jnp.zeros(x.shape, compute) for x in qs]
    init = (tuple(zeros), k, v, jnp.zeros(k.shape, compute), jnp.zeros(v.shape, compute))
    init = _vma.match(init, q, k, v, sink, q_len, kv_len, out, lse, d_out, d_lse)
    d_q, _, _, d_k, d_v = lax.fori_loop(0, cfg.size, step, init)
    d_q = jnp.concatenate(d_q, axis=3)
    d_sink = None
    if sink is not None:
        # d sink = -sum_q p_sink_q * D_q over this device's rows (the sink is one more entry
        # of each row, with no value), summed over the devices that share the sink.
        delta = jnp.sum(d_out.astype(compute) * out, axis=-1) - d_lse.astype(compute)
        lowest = jnp.finfo(compute).min
        finite_lse = jnp.where(lse == lowest, 0.0, lse)
        sink_c = sink.astype(compute)[..., None]
        p_sink = jnp.where(sink_c == -jnp.inf, 0.0, jnp.exp(sink_c - finite_lse))
        d_sink = ca._sum_to(-p_sink * delta, (*sink.shape, 1))[..., 0]
        d_sink = _vma.sum_to(d_sink, sink).astype(sink.dtype)
    return (
        d_q.astype(q.dtype),
        d_k.astype(k.dtype),
        d_v.astype(v.dtype),
        d_sink,
        None,
        None,
    )


ring.defvjp(_fwd, _bwd)
