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


def block_logits(
    cfg: Config, x: Inputs, i: jax.Array, j: jax.Array, q_blk: jax.Array, k_blk: jax.Array
) -> jax.Array:
    """Scaled logits of block ``(i, j)``, ``(B, Hkv, G, block_q, block_k)``, with invalid
    places (and ``-inf`` logits, which a ``-inf`` bias makes) at the lowest finite float and
    every valid one above it: nothing here is infinite unless the input is
    (``jax.debug_infs`` checks every intermediate in eager mode), and ``s > lowest`` tells
    the valid places. Query ``q`` and key ``k`` are compared at ``q + offset`` and ``k``."""
    compute = compute_dtype(cfg.dtype)
    s = mm(cfg, "bhgqd,bhkd->bhgqk", q_blk, k_blk) * jnp.asarray(cfg.scale, compute)
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
    valid = valid & ~is_neginf(s)
    # A +inf logit (from a +inf bias, or q.k overflowing) becomes the largest float: the
    # running max stays finite, so s - max is 0 there and -inf-like elsewhere, and the row's
    # mass is shared among its +inf entries as on the dense path, instead of inf - inf = NaN.
    low = lowest(compute)
    s = jnp.clip(s, jnp.nextafter(low, jnp.zeros((), compute)), _finfo(compute).max)
    return jnp.where(valid, s, low)


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
