"""Which (query, key) pairs attention lets through, and the inputs no pair uses.

One rule for both paths: the dense path applies ``position_mask`` to the whole
``(q_len, kv_len)`` grid (``dense_mask``), the chunked path to each block's positions.
Each path silences the rows no pair uses (``silence_dead_rows``) as it starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers.attention._arguments import Inputs, Settings


def both(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """``a & b``, where ``None`` lets everything through."""
    if a is None:
        return b
    return a if b is None else a & b


def position_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    is_causal: bool,
    window: int | None,
    lookahead: int | None,
) -> jax.Array | None:
    """Which pairs the structure lets through: key ``k`` is visible from query ``q`` when
    ``k <= q`` (causal), ``q - k < window`` (look-back) and ``k - q <= lookahead``;
    ``None`` when nothing is restricted. ``q_pos`` and ``k_pos`` broadcast together."""
    visible = None
    if is_causal:
        visible = k_pos <= q_pos
    if window is not None:
        visible = both(visible, q_pos - k_pos < window)
    if lookahead is not None:
        visible = both(visible, k_pos - q_pos <= lookahead)
    return visible


def dense_mask(
    inputs: Inputs, settings: Settings, logits_shape: tuple[int, ...]
) -> tuple[Inputs, jax.Array | None]:
    """The dense path's masking, in one place: ``inputs`` with the rows no pair uses
    silenced (:func:`silence_dead_rows`), and the boolean mask of its ``(batch..., heads,
    q_len, kv_len)`` logits: ``mask``, the structure and the per-batch lengths together;
    ``None`` for no mask."""
    q_len, kv_len = logits_shape[-2:]
    same = segment_mask(inputs.q_segments, inputs.kv_segments)
    if same is not None:
        # Folded into the mask, so that silence_dead_rows sees the queries and keys that
        # no other position shares a segment with.
        mask = both(inputs.mask, same)
        inputs = inputs._replace(mask=mask, q_segments=None, kv_segments=None)
    q_pos = lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0)
    k_pos = lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1)
    structure = position_mask(
        q_pos, k_pos, settings.is_causal, settings.window, settings.lookahead
    )
    where = both(inputs.mask, structure)
    if inputs.q_lengths is not None:
        where = both(where, q_pos < inputs.q_lengths[..., None, None, None])
    if inputs.kv_lengths is not None:
        where = both(where, k_pos < inputs.kv_lengths[..., None, None, None])
    return silence_dead_rows(inputs), where


def segment_mask(q_ids: jax.Array | None, kv_ids: jax.Array | None) -> jax.Array | None:
    """``(batch..., 1, q_len, kv_len)``: which pairs share a segment; ``None`` for no ids."""
    if q_ids is None or kv_ids is None:
        return None
    return (q_ids[..., :, None] == kv_ids[..., None, :])[..., None, :, :]


def shares_a_segment(ids: jax.Array, others: jax.Array) -> jax.Array:
    """Per position of ``ids`` ``(batch..., n)``, whether its id occurs in ``others``
    ``(batch..., m)``: a binary search in the sorted ``others``, never an ``n x m`` array."""
    batch, n, m = ids.shape[:-1], ids.shape[-1], others.shape[-1]
    if m == 0:
        return jnp.zeros(ids.shape, bool)
    flat_ids = ids.reshape(-1, n)
    ordered = jnp.sort(others.reshape(-1, m), axis=-1)
    at = jax.vmap(jnp.searchsorted)(ordered, flat_ids)
    found = jnp.take_along_axis(ordered, jnp.minimum(at, m - 1), axis=-1) == flat_ids
    return found.reshape(*batch, n)


def silence_dead_rows(
    inputs: Inputs,
    positions: jax.Array | None = None,
    all_q_segments: jax.Array | None = None,
    all_kv_segments: jax.Array | None = None,
) -> Inputs:
    """Zero the queries, keys and values that no pair of the attention uses.

    A key that every query masks (padding past ``key_lengths``, or a mask column that is
    False throughout) has weight 0 in every row, but 0 times the NaN or inf that padding
    may hold is NaN: in the weighted sum, and in the gradient of the query through the
    logits. Likewise a query that attends nothing, in the gradient of the keys. Zeroed,
    they contribute exactly nothing, and their own gradients are exactly 0.

    ``positions`` are the rows' positions that the lengths count, the same for queries
    and keys (the ring's local block in the global sequence); by default ``0, 1, ...``.
    ``all_q_segments`` and ``all_kv_segments`` are the ids of every query and key (the
    ring's whole sequence), by default ``inputs``' own: a query whose id no key has is
    dead, and likewise a key.
    """
    query, key, value = inputs.query, inputs.key, inputs.value
    mask, q_lengths, kv_lengths = inputs.mask, inputs.q_lengths, inputs.kv_lengths
    q_ids, kv_ids = inputs.q_segments, inputs.kv_segments
    if mask is None and q_lengths is None and kv_lengths is None and q_ids is None:
        return inputs
    batch, q_len = query.shape[:-3], query.shape[-3]
    kv_len = key.shape[-3]
    q_live = live_positions(mask, q_lengths, batch, q_len, (-3, -1), positions)
    k_live = live_positions(mask, kv_lengths, batch, kv_len, (-3, -2), positions)
    if q_ids is not None and kv_ids is not None:
        all_q = q_ids if all_q_segments is None else all_q_segments
        all_kv = kv_ids if all_kv_segments is None else all_kv_segments
        q_seen, k_seen = shares_a_segment(q_ids, all_kv), shares_a_segment(kv_ids, all_q)
        q_live = both(q_live, q_seen)
        k_live = both(k_live, k_seen)
    if q_live is not None:
        query = jnp.where(q_live[..., None, None], query, 0)
    if k_live is not None:
        key = jnp.where(k_live[..., None, None], key, 0)
        value = jnp.where(k_live[..., None, None], value, 0)
    return inputs._replace(query=query, key=key, value=value)


def live_positions(
    mask: jax.Array | None,
    lengths: jax.Array | None,
    batch: tuple[int, ...],
    n: int,
    reduce: tuple[int, int],
    positions: jax.Array | None = None,
) -> jax.Array | None:
    """Per batch entry, which of ``n`` positions some pair may use: below ``lengths`` and
    not masked along the mask's heads and other positions; shape ``(batch..., n)``."""
    live = None
    if mask is not None:
        full = mask.reshape((1,) * (len(batch) + 3 - mask.ndim) + mask.shape)
        any_live = jnp.any(full, axis=reduce)
        live = jnp.broadcast_to(any_live, (*batch, n))
    if lengths is not None:
        at = jnp.arange(n, dtype=jnp.int32) if positions is None else positions
        below = at < lengths[..., None]
        live = below if live is None else live & below
    return live
