"""The chunked attention path's building blocks: its static configuration, the block
loops' bounds, each block's masked logits and dropout mask.

Arrays are in the canonical layout of ``_chunked_rule`` (see its docstring); a block
``(i, j)`` is query rows ``[i block_q, (i + 1) block_q)`` against key columns
``[j block_k, (j + 1) block_k)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from stablelayers._core.arithmetic import compute_dtype
from stablelayers._core.nonfinite import is_neginf
from stablelayers.attention._arguments import Inputs
from stablelayers.attention._masks import position_mask

# jnp.finfo is untyped; its fields are numpy scalars.
_finfo = cast(Callable[[DTypeLike], Any], jnp.finfo)


def lowest(dtype: DTypeLike) -> Any:
    """The lowest finite value of a float dtype: an empty row's logsumexp inside."""
    return _finfo(dtype).min


class Config(NamedTuple):
    """The static part of a call: hashable, passed as a non-differentiable argument."""

    block_q: int
    block_k: int
    scale: float
    is_causal: bool
    dtype: jnp.dtype  # of the matmul inputs; logits and softmax are float32 or wider
    precision: lax.PrecisionLike
    # Key k is masked from query q when q - k >= window (jax.nn's left window) ...
    window: int | None = None
    # ... or when k - q > lookahead (its right window).
    lookahead: int | None = None
    broadcast_dropout: bool = False
    dropout: bool = False
    # The logits become soft_cap * tanh(s / soft_cap) before the bias and the masks.
    soft_cap: float | None = None


class Grads(NamedTuple):
    """Gradients being summed, in the compute dtype: shapes of q, k, v and bias."""

    d_q: jax.Array
    d_k: jax.Array
    d_v: jax.Array
    d_bias: jax.Array | None


def lengths(x: Inputs) -> tuple[jax.Array, jax.Array]:
    """``(q_lengths, kv_lengths)``, ``(B,)`` int32, which the chunked layout always gives."""
    assert x.q_lengths is not None and x.kv_lengths is not None
    return x.q_lengths, x.kv_lengths


def offset(x: Inputs) -> jax.Array | int:
    """Where query 0 sits in key positions: 0 but in the ring's chunk pairs."""
    return 0 if x.offset is None else x.offset


def mm(cfg: Config, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)`` at ``cfg.precision``, summed in the compute dtype."""
    return jnp.einsum(
        spec, a, b, precision=cfg.precision, preferred_element_type=compute_dtype(cfg.dtype)
    )


def _slice(x: jax.Array, axis: int, start: jax.Array, size: int) -> jax.Array:
    """``x[..., start:start + size, ...]`` along ``axis``, or ``x`` where that axis is 1."""
    if x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def add_slice(
    total: jax.Array, axis_starts: tuple[jax.Array | int, ...], part: jax.Array
) -> jax.Array:
    """``total`` with ``part`` added at ``axis_starts`` (a start per axis of size > 1)."""
    starts = [
        jnp.asarray(s if total.shape[a] > 1 else 0, jnp.int32)
        for a, s in enumerate(axis_starts)
    ]
    current = lax.dynamic_slice(total, starts, part.shape)
    return lax.dynamic_update_slice(total, current + part, starts)


def kv_range(
    cfg: Config, x: Inputs, i: jax.Array, n_k: int, kv_max: jax.Array, q_max: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Key blocks ``[lo, hi)`` that query block ``i`` can see."""
    first = i * cfg.block_q + offset(x)  # the block's first query, in key positions
    last = first + cfg.block_q - 1
    hi = (jnp.minimum(kv_max, last + 1) if cfg.is_causal else kv_max) + cfg.block_k - 1
    hi = jnp.minimum(hi // cfg.block_k, n_k)
    lo = jnp.int32(0)
    if cfg.window is not None:
        lo = jnp.maximum(first - cfg.window + 1, 0) // cfg.block_k
    hi = jnp.where(i * cfg.block_q < q_max, hi, lo)
    return lo, jnp.maximum(hi, lo)


def q_range(
    cfg: Config, x: Inputs, j: jax.Array, n_q: int, q_max: jax.Array, kv_max: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Query blocks ``[lo, hi)`` that see key block ``j``."""
    first = j * cfg.block_k - offset(x)  # the block's first key, in query positions
    lo = jnp.maximum(first, 0) // cfg.block_q if cfg.is_causal else jnp.int32(0)
    hi = (q_max + cfg.block_q - 1) // cfg.block_q
    if cfg.window is not None:
        hi = jnp.minimum(hi, (first + cfg.block_k + cfg.window - 2) // cfg.block_q + 1)
    hi = jnp.where(j * cfg.block_k < kv_max, jnp.minimum(hi, n_q), lo)
    return lo, jnp.maximum(hi, lo)


def segment_overlap(cfg: Config, x: Inputs) -> jax.Array | None:
    """``(n_q, n_k)``: whether query block ``i`` and key block ``j`` may share a segment
    in some batch entry, from each block's range of ids over its valid positions (those
    below the lengths); ``None`` without segment ids. With ids sorted along the sequence
    (packed documents) this is exact; otherwise it keeps every pair that may meet."""
    if x.q_segments is None or x.kv_segments is None:
        return None
    q_lengths, kv_lengths = lengths(x)
    top, bottom = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min

    def ranges(ids: jax.Array, n: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
        valid = jnp.arange(ids.shape[1])[None, :] < n[:, None]
        lo = jnp.where(valid, ids, top).reshape(ids.shape[0], -1, block).min(axis=-1)
        hi = jnp.where(valid, ids, bottom).reshape(ids.shape[0], -1, block).max(axis=-1)
        return lo, hi

    q_lo, q_hi = ranges(x.q_segments, q_lengths, cfg.block_q)
    k_lo, k_hi = ranges(x.kv_segments, kv_lengths, cfg.block_k)
    meet = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    return jnp.any(meet, axis=0)


def narrow(
    lo: jax.Array, hi: jax.Array, meets: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """The loop bounds ``[lo, hi)`` cut to the first and last block that ``meets`` (a row
    or column of :func:`segment_overlap`) lets through: the blocks of other documents are
    never visited, forward or backward."""
    if meets is None:
        return lo, hi
    at = jnp.arange(meets.shape[0], dtype=jnp.int32)
    first = jnp.min(jnp.where(meets, at, meets.shape[0]))
    last = jnp.max(jnp.where(meets, at, -1)) + 1
    lo = jnp.maximum(lo, first)
    return lo, jnp.maximum(jnp.minimum(hi, last), lo)


def block_logits(
    cfg: Config, x: Inputs, i: jax.Array, j: jax.Array, q_blk: jax.Array, k_blk: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Scaled logits of block ``(i, j)``, ``(B, Hkv, G, block_q, block_k)``, with invalid
    places (and ``-inf`` logits, which a ``-inf`` bias makes) at the lowest finite float and
    every valid one above it: nothing here is infinite unless the input is
    (``jax.debug_infs`` checks every intermediate in eager mode), and ``s > lowest`` tells
    the valid places. Query ``q`` and key ``k`` are compared at ``q + offset`` and ``k``.

    With a soft cap ``c``, also the slope ``d(c tanh(u / c)) / du = 1 - tanh^2(u / c)`` of
    each logit, which the backward pass multiplies into ``dS`` before the matmuls back to
    ``q`` and ``k`` (the bias is added after the cap, so its gradient is ``dS`` itself);
    ``None`` without a cap."""
    compute = compute_dtype(cfg.dtype)
    s = mm(cfg, "bhgqd,bhkd->bhgqk", q_blk, k_blk) * jnp.asarray(cfg.scale, compute)
    slope = None
    if cfg.soft_cap is not None:
        cap = jnp.asarray(cfg.soft_cap, compute)
        t = jnp.tanh(s / cap)
        s, slope = cap * t, 1.0 - t * t
    q0, k0 = i * cfg.block_q, j * cfg.block_k
    if x.bias is not None:
        s = s + _slice(_slice(x.bias, 3, q0, cfg.block_q), 4, k0, cfg.block_k).astype(compute)

    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (cfg.block_q, 1), 0)
    k_pos = k0 + lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
    q_lengths, kv_lengths = lengths(x)
    valid = (k_pos < kv_lengths[:, None, None, None, None]) & (
        q_pos < q_lengths[:, None, None, None, None]
    )
    # The dense path's rule (_masks), at this block's positions.
    visible = position_mask(q_pos + offset(x), k_pos, cfg.is_causal, cfg.window, cfg.lookahead)
    if visible is not None:
        valid = valid & visible
    if x.mask is not None:
        valid = valid & _slice(_slice(x.mask, 3, q0, cfg.block_q), 4, k0, cfg.block_k)
    if x.q_segments is not None and x.kv_segments is not None:
        q_ids = lax.dynamic_slice_in_dim(x.q_segments, q0, cfg.block_q, 1)
        k_ids = lax.dynamic_slice_in_dim(x.kv_segments, k0, cfg.block_k, 1)
        valid = valid & (q_ids[:, None, None, :, None] == k_ids[:, None, None, None, :])
    valid = valid & ~is_neginf(s)
    # A +inf logit (from a +inf bias, or q.k overflowing) becomes the largest float: the
    # running max stays finite, so s - max is 0 there and -inf-like elsewhere, and the row's
    # mass is shared among its +inf entries as on the dense path, instead of inf - inf = NaN.
    low = lowest(compute)
    s = jnp.clip(s, jnp.nextafter(low, jnp.zeros((), compute)), _finfo(compute).max)
    return jnp.where(valid, s, low), slope


def keep_mask(
    cfg: Config, x: Inputs, i: jax.Array, j: jax.Array, shape: tuple[int, ...]
) -> jax.Array:
    """The dropout keep mask of block ``(i, j)``, scaled by ``1 / keep_prob``."""
    assert x.rng is not None and x.rate is not None
    keep_prob = 1.0 - x.rate
    if cfg.broadcast_dropout:
        shape = (1, 1, 1, *shape[-2:])
    block_rng = jax.random.fold_in(jax.random.fold_in(x.rng, i), j)
    keep = jax.random.bernoulli(block_rng, keep_prob, shape)
    return jnp.where(keep, 1.0 / keep_prob, 0.0).astype(compute_dtype(cfg.dtype))
