"""``dot_product_attention``'s layout to the chunked path's and back.

The public layout is ``(batch..., length, heads, head_dim)`` with grouped key/value heads;
``_chunked_rule`` takes ``(B, kv_heads, groups, length, head_dim)`` queries and
``(B, kv_heads, length, head_dim)`` keys and values, lengths padded to whole blocks, and
masks and biases with each dimension 1 or full.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.arithmetic import compute_dtype
from stablelayers._core.nonfinite import neg_inf_where
from stablelayers.attention import _chunked_blocks as cb
from stablelayers.attention import _chunked_rule
from stablelayers.attention._arguments import Inputs, Settings, block_sizes
from stablelayers.attention._masks import silence_dead_rows


def chunked(
    inputs: Inputs, settings: Settings, chunk_size: int | tuple[int, int] | None
) -> tuple[jax.Array, jax.Array]:
    """The chunked path on ``dot_product_attention``'s checked arguments: ``(out, lse)``,
    ``out`` as ``(batch..., q_len, heads, v_dim)`` and ``lse`` in the blocks' layout
    ``(B, kv_heads, groups, q_len)``, the lowest float marking a row that attends nothing
    (:func:`public_logsumexp` makes it the public one, where it is asked for)."""
    inputs = silence_dead_rows(inputs)
    query, key, value = inputs.query, inputs.key, inputs.value
    bias, mask, sink = inputs.bias, inputs.mask, inputs.sink
    batch = query.shape[:-3]
    q_len, heads, _ = query.shape[-3:]
    kv_len, kv_heads, _ = value.shape[-3:]
    groups = heads // kv_heads
    n_batch = math.prod(batch)
    dtype = query.dtype
    compute = compute_dtype(dtype)
    block_q, block_k = block_sizes(chunk_size)
    block_q, block_k = min(block_q, q_len), min(block_k, kv_len)
    q_pad, kv_pad = -q_len % block_q, -kv_len % block_k

    q, k, v = to_blocks(query, key, value)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, q_pad), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, kv_pad), (0, 0))) for x in (k, v))
    shape = (batch, kv_heads, groups, q_len, kv_len, q_pad, kv_pad)
    bias = None if bias is None else _canonical(bias.astype(compute), *shape)
    mask = None if mask is None else _canonical(mask, *shape)
    if sink is not None:
        sink = sink.reshape((1,) * (len(batch) + 1 - sink.ndim) + sink.shape)
        if math.prod(sink.shape[: len(batch)]) == 1:
            sink = sink.reshape(1, sink.shape[-1])
        else:
            sink = jnp.broadcast_to(sink, (*batch, sink.shape[-1])).reshape(n_batch, -1)
        sink = sink.reshape(
            sink.shape[0], *((kv_heads, groups) if sink.shape[1] > 1 else (1, 1))
        )
    q_lengths, kv_lengths = (
        jnp.full((n_batch,), n, jnp.int32)
        if given is None
        else jnp.clip(given.reshape(n_batch), 0, n)
        for given, n in ((inputs.q_lengths, q_len), (inputs.kv_lengths, kv_len))
    )
    q_segments, kv_segments = (
        None if ids is None else segments_to_blocks(ids, pad)
        for ids, pad in ((inputs.q_segments, q_pad), (inputs.kv_segments, kv_pad))
    )
    rng = rate = None
    broadcast = False
    if settings.dropout is not None:
        rng, given_rate, broadcast = settings.dropout
        rate = jnp.asarray(lax.stop_gradient(given_rate), compute)
    cfg = _chunked_rule.Config(
        block_q=block_q,
        block_k=block_k,
        scale=float(settings.scale),
        is_causal=bool(settings.is_causal),
        window=settings.window,
        lookahead=settings.lookahead,
        dtype=dtype,
        precision=settings.precision,
        broadcast_dropout=bool(broadcast),
        dropout=settings.dropout is not None,
        soft_cap=settings.soft_cap,
    )
    blocks = Inputs(
        q,
        k,
        v,
        bias,
        mask,
        sink,
        q_lengths,
        kv_lengths,
        rng,
        rate,
        q_segments=q_segments,
        kv_segments=kv_segments,
    )
    out, lse = _chunked_rule.chunked_attention(cfg, blocks)
    out = from_blocks(out[:, :, :, :q_len], batch)
    return out.astype(dtype), lse[:, :, :, :q_len]


def to_blocks(
    query: jax.Array, key: jax.Array, value: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The public ``(batch..., length, heads, head_dim)`` query, key and value as the
    chunked path's ``(B, kv_heads, groups, Lq, D)`` and ``(B, kv_heads, Lk, D)``, unpadded
    (the ring's chunks too)."""
    *batch, q_len, heads, _ = query.shape
    kv_len, kv_heads = key.shape[-3:-1]
    n_batch, groups = math.prod(batch), heads // kv_heads
    q = query.reshape(n_batch, q_len, kv_heads, groups, -1).transpose(0, 2, 3, 1, 4)
    k, v = (
        x.reshape(n_batch, kv_len, kv_heads, -1).transpose(0, 2, 1, 3) for x in (key, value)
    )
    return q, k, v


def segments_to_blocks(ids: jax.Array, pad: int) -> jax.Array:
    """Segment ids ``(batch..., length)`` as the chunked path's ``(B, length + pad)``. The
    padding repeats the last id, so that it widens no block's range of ids."""
    flat = ids.reshape(-1, ids.shape[-1])
    return jnp.pad(flat, ((0, 0), (0, pad)), mode="edge")


def from_blocks(out: jax.Array, batch: tuple[int, ...]) -> jax.Array:
    """The chunked path's ``(B, kv_heads, groups, Lq, Dv)`` output, unpadded, in the
    public layout ``(batch..., Lq, heads, Dv)``."""
    _, kv_heads, groups, q_len, v_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(*batch, q_len, kv_heads * groups, v_dim)


def public_logsumexp(lse: jax.Array, batch: tuple[int, ...]) -> jax.Array:
    """The chunked path's ``(B, kv_heads, groups, Lq)`` logsumexp, unpadded, as
    ``(batch..., heads, Lq)``, with ``-inf`` where an empty row holds the lowest float."""
    _, kv_heads, groups, q_len = lse.shape
    lse = lse.reshape(*batch, kv_heads * groups, q_len)
    lowest = lse == cb.lowest(lse.dtype)
    return jnp.where(lowest, neg_inf_where(lowest, lse.dtype), lse)


def _canonical(
    x: jax.Array,
    batch: tuple[int, ...],
    kv_heads: int,
    groups: int,
    q_len: int,
    kv_len: int,
    q_pad: int,
    kv_pad: int,
) -> jax.Array:
    """``x``, broadcastable to ``(batch..., heads, q_len, kv_len)``, as the chunked path's
    5-D ``(B, kv_heads, groups, q_len, kv_len)``, each dimension 1 or full, padded."""
    nd = len(batch)
    x = x.reshape((1,) * (nd + 3 - x.ndim) + x.shape)
    tail = x.shape[nd:]
    if math.prod(x.shape[:nd]) == 1:
        x = x.reshape(1, *tail)
    else:
        x = jnp.broadcast_to(x, (*batch, *tail)).reshape(math.prod(batch), *tail)
    heads = (kv_heads, groups) if tail[0] > 1 else (1, 1)
    x = x.reshape(x.shape[0], *heads, *tail[1:])
    pads = [(0, 0)] * 3 + [
        (0, pad if n > 1 else 0) for n, pad in ((tail[1], q_pad), (tail[2], kv_pad))
    ]
    return jnp.pad(x, pads)
