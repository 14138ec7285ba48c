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


def silence_dead_rows(inputs: Inputs, positions: jax.Array | None = None) -> Inputs:
    """Zero the queries, keys and values that no pair of the attention uses.

    A key that every query masks (padding past ``key_lengths``, or a mask column that is
    False throughout) has weight 0 in every row, but 0 times the NaN or inf that padding
    may hold is NaN: in the weighted sum, and in the gradient of the query through the
    logits. Likewise a query that attends nothing, in the gradient of the keys. Zeroed,
    they contribute exactly nothing, and their own gradients are exactly 0.

    ``positions`` are the rows' positions that the lengths count, the same for queries
    and keys (the ring's local block in the global sequence); by default ``0, 1, ...``.
    """
    query, key, value = inputs.query, inputs.key, inputs.value
    mask, q_lengths, kv_lengths = inputs.mask, inputs.q_lengths, inputs.kv_lengths
    if mask is None and q_lengths is None and kv_lengths is None:
        return inputs
    batch, q_len = query.shape[:-3], query.shape[-3]
    kv_len = key.shape[-3]
    q_live = live_positions(mask, q_lengths, batch, q_len, (-3, -1), positions)
    k_live = live_positions(mask, kv_lengths, batch, kv_len, (-3, -2), positions)
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
