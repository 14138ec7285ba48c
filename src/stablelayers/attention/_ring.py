"""Context parallelism: :func:`ring_attention` inside ``shard_map``, and
:func:`ring_attention_sharded`, which does the ``shard_map`` for arrays on a ``Mesh``.

The ring itself (the rotation, the chunk pairs, the ``custom_vjp``) is in ``_ring_rule``;
here are the checks, the canonical layout and the zigzag order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.attention import (
    _arguments,
    _chunked_layout,
    _chunked_rule,
    _layer_segments,
    _masks,
    _ring_rule,
    _sharding,
)
from stablelayers.attention._arguments import Inputs

Layout = Literal["contiguous", "zigzag"]
_spec = cast(Callable[..., PartitionSpec], PartitionSpec)  # untyped in jax.sharding


@allow_rank_promotion
def ring_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    axis_name: str,
    sink: ArrayLike | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    layout: Layout = "contiguous",
    dtype: DTypeLike | None = None,
    precision: jax.lax.PrecisionLike = None,
    chunk_size: int | tuple[int, int] | None = None,
    return_logsumexp: bool = False,
    segment_ids: ArrayLike | None = None,
    query_segment_ids: ArrayLike | None = None,
    key_value_segment_ids: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`stablelayers.dot_product_attention` over a sequence split across devices.

    Call it inside ``jax.shard_map`` with the sequence axis of ``query``, ``key`` and
    ``value`` split over the mesh axis ``axis_name`` (``N`` devices). Keys and values
    travel round the ring with ``lax.ppermute`` while each device continues the chunked
    online softmax over the block it holds (the logsumexp merge of the partial results).
    The backward pass rotates keys, values and their gradients again and keeps only the
    output and one logsumexp per row. A device holds one device's keys and values at a
    time, and one chunk of them in flight.

    Each device's block is two chunks of ``L / 2N`` positions of the global sequence of
    length ``L``: with ``layout="contiguous"``, device ``d`` holds positions
    ``[d L/N, (d+1) L/N)`` (``shard_map``'s plain split); with ``layout="zigzag"``, chunks
    ``d`` and ``2N - 1 - d``, which balances causal attention exactly (every device does
    the same work at every step; see :func:`zigzag_order` to lay a sequence out so).

    Args:
        query: local block, shape ``(batch..., L/N, heads, qk_dim)``.
        key: local block, shape ``(batch..., L/N, kv_heads, qk_dim)``.
        value: local block, shape ``(batch..., L/N, kv_heads, v_dim)``.
        axis_name: the ``shard_map`` mesh axis the sequence is split over.
        sink: optional learned sink logits broadcastable to ``(batch..., heads)``, the
            same on every device of the ring. Differentiable.
        scale: multiplies the logits; defaults to ``1 / sqrt(qk_dim)``.
        is_causal: mask key ``k`` from query ``q`` when ``k > q``, in global positions.
        query_seq_lengths: optional global int lengths broadcastable to ``(batch...)``,
            the same on every device; queries at global position ``>=`` it attend
            nothing.
        key_value_seq_lengths: likewise for keys: keys at global position ``>=`` it are
            masked.
        layout: ``"contiguous"`` or ``"zigzag"``, the global positions of the local block.
        dtype: computation dtype (default: the promoted dtype of the inputs); logits and
            softmax are at least float32.
        precision: ``jax.lax.Precision`` for the einsums.
        chunk_size: block sizes of the chunked path on each device, as in
            :func:`stablelayers.dot_product_attention`.
        return_logsumexp: also return each local row's logsumexp, shape
            ``(batch..., heads, L/N)``, ``-inf`` for a row that attends nothing.
        segment_ids: optional local int ids, broadcastable to ``(batch..., L/N)``, in the
            same layout as the queries: a query sees a key only when their ids are equal
            (packed sequences). The key ids travel round the ring with the keys, and
            block pairs that share no segment are skipped.
        query_segment_ids: with ``key_value_segment_ids``, separate local ids for the
            queries and the keys, as in :func:`stablelayers.dot_product_attention`.
        key_value_segment_ids: the local ids of the keys.
        logits_soft_cap: optional positive float ``c``: logits ``c * tanh(s / c)``, as in
            :func:`stablelayers.dot_product_attention`.

    Returns:
        The local output, shape ``(batch..., L/N, heads, v_dim)``, dtype ``dtype``; a row
        with nothing to attend is exactly 0 and passes no gradient.

    Raises:
        ValueError: called outside ``shard_map`` or with an ``axis_name`` it does not
            bind, the local length is odd, the shapes do not fit, or ``layout`` is unknown.
    """
    try:
        size = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"ring_attention needs the mesh axis {axis_name!r} bound: call it inside "
            "jax.shard_map with the sequence split over that axis, or use "
            "stablelayers.ring_attention_sharded, which does the shard_map for you."
        ) from None
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"`layout` must be 'contiguous' or 'zigzag', got {layout!r}.")
    query, key, value = _arguments.check_arrays(query, key, value, dtype)
    dtype = query.dtype
    batch, q_len, heads, kv_len, kv_heads = _arguments.check_shapes(query, key, value)
    if q_len != kv_len or q_len % 2:
        raise ValueError(
            "ring_attention needs the queries, keys and values split alike, an even number "
            f"of positions per device (two chunks each); got {q_len} queries and {kv_len} "
            f"keys per device. Pad the sequence to a multiple of {2 * size}."
        )
    groups, chunk = heads // kv_heads, q_len // 2
    lengths = [
        _global_lengths(n, name, batch, q_len * size)
        for n, name in (
            (query_seq_lengths, "query_seq_lengths"),
            (key_value_seq_lengths, "key_value_seq_lengths"),
        )
    ]
    block_q, block_k = (min(b, chunk) for b in _arguments.block_sizes(chunk_size))
    scale = float(_arguments.scale_or_default(scale, query.shape[-1]))
    soft_cap = _arguments.check_soft_cap(logits_soft_cap)
    q_seg, kv_seg = _arguments.check_segment_ids(
        segment_ids, query_segment_ids, key_value_segment_ids, batch, q_len, kv_len
    )
    inner = _chunked_rule.Config(
        block_q, block_k, scale, is_causal, dtype, precision, soft_cap=soft_cap
    )
    cfg = _ring_rule.RingConfig(inner, axis_name, size, chunk, layout == "zigzag")

    # Queries and keys past the global lengths, or whose segment no key (query) has
    # anywhere on the ring, are zeroed, as on one device.
    q_lengths, kv_lengths = (n.reshape(batch) for n in lengths)
    given = Inputs(
        query,
        key,
        value,
        None,
        None,
        None,
        q_lengths,
        kv_lengths,
        q_segments=q_seg,
        kv_segments=kv_seg,
    )
    every = [
        None if ids is None else lax.all_gather(ids, axis_name, axis=ids.ndim - 1, tiled=True)
        for ids in (q_seg, kv_seg)
    ]
    live = _masks.silence_dead_rows(given, _positions(cfg), *every)
    q, k, v = _chunked_layout.to_blocks(live.query, live.key, live.value)
    halves = [
        _halves(x, x.ndim - 2, chunk, b) for x, b in ((q, block_q), (k, block_k), (v, block_k))
    ]
    sinks = None if sink is None else _canonical_sink(sink, dtype, batch, kv_heads, groups)
    q_pair, k_pair, v_pair = halves
    q_ids, kv_ids = (
        None if ids is None else _halves(ids.reshape(-1, q_len), 1, chunk, b)
        for ids, b in ((q_seg, block_q), (kv_seg, block_k))
    )
    q_lengths_flat, kv_lengths_flat = lengths
    chunks = _ring_rule.Chunks(
        q_pair, k_pair, v_pair, sinks, q_lengths_flat, kv_lengths_flat, q_ids, kv_ids
    )
    outs, lses = _ring_rule.ring(cfg, chunks)
    out = jnp.concatenate([x[..., :chunk, :] for x in outs], axis=3)
    lse = jnp.concatenate([x[..., :chunk] for x in lses], axis=3)
    out = _chunked_layout.from_blocks(out, batch).astype(dtype)
    if not return_logsumexp:
        return out
    return out, _chunked_layout.public_logsumexp(lse, batch)


def _global_lengths(
    lengths: ArrayLike | None, name: str, batch: tuple[int, ...], total: int
) -> jax.Array:
    """Per-batch global lengths, flat ``(B,)`` int32 in ``[0, total]``."""
    checked = _arguments.check_lengths(lengths, name, batch)
    if checked is None:
        return jnp.full((math.prod(batch),), total, jnp.int32)
    return jnp.clip(checked.reshape(-1), 0, total)


def _canonical_sink(
    sink: ArrayLike, dtype: jnp.dtype, batch: tuple[int, ...], kv_heads: int, groups: int
) -> jax.Array:
    """The sink logits as ``(B, Hkv, G)`` in the compute dtype."""
    heads = kv_heads * groups
    sink = _arguments.check_sink(sink, batch, heads, dtype)
    return jnp.broadcast_to(sink, (*batch, heads)).reshape(-1, kv_heads, groups)


def _positions(cfg: _ring_rule.RingConfig) -> jax.Array:
    """Global positions of this device's local block, shape ``(2C,)``."""
    first, second = _ring_rule.chunk_ids(cfg, lax.axis_index(cfg.axis_name))
    idx = jnp.arange(cfg.chunk, dtype=jnp.int32)
    return jnp.concatenate([first * cfg.chunk + idx, second * cfg.chunk + idx])


def _halves(x: jax.Array, axis: int, chunk: int, block: int) -> tuple[jax.Array, jax.Array]:
    """The two chunks along ``axis``, each padded to a whole number of blocks."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, -chunk % block)
    first = lax.slice_in_dim(x, 0, chunk, axis=axis)
    second = lax.slice_in_dim(x, chunk, None, axis=axis)
    return jnp.pad(first, widths), jnp.pad(second, widths)


def zigzag_order(seq_len: int, num_devices: int) -> np.ndarray:
    """The permutation that lays a sequence out in the zigzag layout: ``x[:, order]``
    split contiguously over ``num_devices`` gives device ``d`` chunks ``d`` and
    ``2 num_devices - 1 - d`` of ``2 num_devices`` equal chunks. ``np.argsort(order)``
    undoes it."""
    n = 2 * num_devices
    if seq_len % n:
        raise ValueError(f"The sequence length {seq_len} must be a multiple of {n}.")
    c = seq_len // n
    ids = [i for d in range(num_devices) for i in (d, n - 1 - d)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in ids])


def ring_attention_sharded(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    mesh: Mesh,
    axis_name: str,
    batch_axis: str | None = None,
    head_axis: str | None = None,
    sink: ArrayLike | None = None,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    segment_ids: ArrayLike | None = None,
    query_segment_ids: ArrayLike | None = None,
    key_value_segment_ids: ArrayLike | None = None,
    is_causal: bool = False,
    layout: Layout | None = None,
    **kwargs: Any,
) -> jax.Array:
    """:func:`ring_attention` on whole arrays: ``shard_map`` over ``mesh`` with the
    sequence (axis 1 of ``(batch, seq, heads, head_dim)``) split over ``axis_name``, the
    batch over ``batch_axis`` and the heads over ``head_axis`` if given.

    With ``is_causal`` the default ``layout`` is ``"zigzag"``: inside the ``shard_map``
    each device sends its two chunks to where the zigzag layout wants them
    (``ppermute``, no device ever holding the whole sequence) and the output comes back
    the same way; pass ``layout="contiguous"`` to skip that, or lay the data out with
    :func:`zigzag_order` yourself and call :func:`ring_attention` directly.
    ``sink`` must then be per head, shape ``(heads,)``; the lengths ``(batch,)``; the
    segment ids ``(batch, seq)``, split and laid out with the sequence (as the attention
    layers' ``segment_ids=`` when this is their ``attention_fn``). Other keywords go to
    :func:`ring_attention`. Returns ``(batch, seq, heads, v_dim)``.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`axis_name` {axis_name!r} is not an axis of the mesh {mesh.axis_names}."
        )
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    if query.ndim != 4:
        raise ValueError(f"`query` must be (batch, seq, heads, head_dim), got {query.shape}.")
    n = mesh.shape[axis_name]
    layout = layout or ("zigzag" if is_causal else "contiguous")
    if query.shape[1] % (2 * n):
        raise ValueError(
            f"The sequence length {query.shape[1]} must be a multiple of {2 * n} (two chunks "
            f"per device on the {n} devices of {axis_name!r}); pad it."
        )
    if segment_ids is None and query_segment_ids is None and key_value_segment_ids is None:
        # Ids that an attention layer hands to its attention_fn (this function, or a
        # module calling it); see _layer_segments.
        handed = _layer_segments.take()
        segment_ids = handed.get("segment_ids")
        query_segment_ids = handed.get("query_segment_ids")
        key_value_segment_ids = handed.get("key_value_segment_ids")
    seq = _spec(batch_axis, axis_name, head_axis)
    per_batch = _spec(batch_axis)
    ids_spec = _spec(batch_axis, axis_name)
    extras: dict[str, jax.Array] = {}
    specs = []
    for name, x, spec in (
        ("sink", sink, _spec(head_axis)),
        ("query_seq_lengths", query_seq_lengths, per_batch),
        ("key_value_seq_lengths", key_value_seq_lengths, per_batch),
        ("segment_ids", segment_ids, ids_spec),
        ("query_segment_ids", query_segment_ids, ids_spec),
        ("key_value_segment_ids", key_value_segment_ids, ids_spec),
    ):
        if x is not None:
            x = jnp.asarray(x)
            if name.endswith("segment_ids") and x.shape != query.shape[:2]:
                raise ValueError(
                    f"`{name}` must have shape (batch, seq) = {query.shape[:2]}, got {x.shape}."
                )
            extras[name] = x
            specs.append(spec)

    def local(q: jax.Array, k: jax.Array, v: jax.Array, *rest: jax.Array) -> jax.Array:
        named = dict(zip(extras, rest, strict=True))
        if layout == "zigzag":
            # From shard_map's contiguous split to the zigzag layout and back, on the ring
            # itself: a global gather would hold the whole sequence on each device.
            q, k, v = (_relayout(x, axis_name, n, to_zigzag=True) for x in (q, k, v))
            for name in named:
                if name.endswith("segment_ids"):
                    named[name] = _relayout(named[name], axis_name, n, to_zigzag=True)
        out = ring_attention(  # an array: return_logsumexp is not among the kwargs
            q,
            k,
            v,
            axis_name=axis_name,
            is_causal=is_causal,
            layout=layout,
            **cast(dict[str, Any], named),
            **kwargs,
        )
        assert isinstance(out, jax.Array)
        return _relayout(out, axis_name, n, to_zigzag=False) if layout == "zigzag" else out

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(seq, seq, seq, *specs), out_specs=seq, check_vma=False
    )
    return sharded(query, key, value, *extras.values())


def _relayout(x: jax.Array, axis_name: str, n: int, *, to_zigzag: bool) -> jax.Array:
    """The local block (sequence on axis 1) moved between the contiguous layout (device
    ``d`` holds chunks ``2d, 2d + 1``) and the zigzag one (chunks ``d, 2n - 1 - d``): each
    chunk goes to its device with ``ppermute`` (a device that receives nothing from a
    source gets zeros, so each slot is the sum of the two sends)."""
    zigzag = [(d, 2 * n - 1 - d) for d in range(n)]
    contiguous = [(2 * d, 2 * d + 1) for d in range(n)]
    source, target = (zigzag, contiguous) if not to_zigzag else (contiguous, zigzag)
    where = {c: (d, slot) for d, chunks in enumerate(target) for slot, c in enumerate(chunks)}
    chunk = x.shape[1] // 2
    halves = (x[:, :chunk], x[:, chunk:])
    slots = []
    for slot in range(2):
        parts = []
        for h in range(2):
            perm = [
                (d, where[chunks[h]][0])
                for d, chunks in enumerate(source)
                if where[chunks[h]][1] == slot
            ]
            parts.append(_sharding.ppermute(halves[h], axis_name, perm))
        slots.append(parts[0] + parts[1])
    return jnp.concatenate(slots, axis=1)
