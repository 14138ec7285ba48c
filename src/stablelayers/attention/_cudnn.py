"""``implementation='cudnn'``: ``jax.nn.dot_product_attention``'s cuDNN fused attention
with stablelayers' semantics laid on top where they can be laid on exactly.

cuDNN computes every row the way ``jax.nn`` does: a query that sees no key gets the mean
of the values (its masked logits are a large negative number, not ``-inf``). Around the
call this module (i) works out, from the lengths, ``is_causal``, the window, the mask and
the bias's ``-inf`` entries, which query rows see no key at all; (ii) zeroes the queries,
keys and values that no pair uses (``_masks.silence_dead_rows``), so that NaN or inf in
padding cannot reach a live row or a gradient as ``0 * NaN``; (iii) clamps ``-inf`` in
the bias to a large finite number, so that a dead row's softmax stays finite in cuDNN's
backward pass; and (iv) sets the dead rows' outputs to exactly 0 with a ``where``, whose
gradient is exactly 0 for them. Rows with a visible key are cuDNN's, to its rounding.

What cuDNN cannot do with these semantics raises at trace time (``_refuse``): sinks,
dropout (cuDNN's own dropout draws another pattern), ``logits_soft_cap``, custom
einsums or ``einsum_dot_general``, ``module`` (it never forms the weights),
``return_logsumexp`` (cuDNN's logsumexp is rounded to the output dtype and carries no
gradient; ``return_residual`` is that and is supported), ``precision``, a window that
looks ahead without ``is_causal``, ``v_dim != qk_dim``, forward mode, and float32
inputs (cuDNN takes float16 and bfloat16: pass ``dtype=jnp.bfloat16``).

Testing without a GPU: ``BACKEND`` names the ``jax.nn`` implementation called underneath.
It is ``"cudnn"``; the tests set it to ``"xla"`` (``jax.nn``'s XLA attention, the same
masking semantics as cuDNN's) so that exactly this wrapper runs on the CPU, and the
float16/bfloat16 requirement is then waived. It is read at trace time.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.switches import forward_mode_enabled
from stablelayers.attention._arguments import Inputs, Settings
from stablelayers.attention._masks import both, dense_mask, segment_mask, silence_dead_rows

# The jax.nn implementation underneath; "xla" only in tests (see the module docstring).
BACKEND = "cudnn"

_OTHERS = "use implementation=None, 'dense' or 'chunked'"


def cudnn_attention(
    inputs: Inputs,
    settings: Settings,
    *,
    custom_einsum: bool,
    sows: bool,
    return_logsumexp: bool,
    return_residual: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``dot_product_attention``'s checked arguments through ``jax.nn``'s cuDNN attention.

    Shapes are the public ones: ``query`` ``(batch..., q_len, heads, dim)``, ``key`` and
    ``value`` ``(batch..., kv_len, kv_heads, dim)``; the batch dimensions are flattened
    into the one ``B`` of cuDNN's ``(B, T, N, H)`` layout and restored. Returns ``out``
    ``(batch..., q_len, heads, dim)``, with ``return_residual`` also the logsumexp per
    row ``(batch..., q_len, heads)`` in the key's dtype, gradient stopped, ``-inf`` for
    a row that sees no key.
    """
    _refuse(inputs, settings, custom_einsum, sows, return_logsumexp)
    query = inputs.query
    batch = query.shape[:-3]
    q_len, heads, dim = query.shape[-3:]
    kv_len, kv_heads = inputs.key.shape[-3:-1]
    dtype = query.dtype
    if q_len == 0 or kv_len == 0:
        # Every row sees nothing (or there is none): exactly 0, no call to cuDNN.
        empty = jnp.zeros((*batch, q_len, heads, dim), dtype)
        no_lse = jnp.full((*batch, q_len, heads), -jnp.inf, inputs.key.dtype)
        return (empty, no_lse) if return_residual else empty

    # Segment ids are an L x L mask here: cuDNN's packed layout is not jax.nn's API.
    mask = both(inputs.mask, segment_mask(inputs.q_segments, inputs.kv_segments))
    inputs = inputs._replace(mask=mask, q_segments=None, kv_segments=None)
    live = _live_rows(inputs, settings, batch, heads, q_len, kv_len)
    inputs = silence_dead_rows(inputs)
    query, key, value = inputs.query, inputs.key, inputs.value
    if live is not None:
        # Queries dead by structure too (silence_dead_rows sees only masks and lengths).
        query = jnp.where(jnp.any(live, axis=-2)[..., None, None], query, 0)

    flat = math.prod(batch)
    bias = None if inputs.bias is None else _finite(inputs.bias.astype(dtype))
    left, right = _window(settings)
    # Typed loosely: jax.nn's overloads split on return_residual, a bool here.
    call: Any = jax.nn.dot_product_attention
    result = call(
        query.reshape(flat, q_len, heads, dim),
        key.reshape(flat, kv_len, kv_heads, dim),
        value.reshape(flat, kv_len, kv_heads, dim),
        bias=_four_d(bias, batch, flat, heads, q_len, kv_len),
        mask=_four_d(inputs.mask, batch, flat, heads, q_len, kv_len),
        scale=settings.scale,
        is_causal=settings.is_causal,
        query_seq_lengths=_flat_lengths(inputs.q_lengths, flat),
        key_value_seq_lengths=_flat_lengths(inputs.kv_lengths, flat),
        local_window_size=None if left is None else (left, right),
        implementation=BACKEND,
        return_residual=return_residual,
    )
    out: jax.Array
    lse: jax.Array | None
    out, lse = result if return_residual else (result, None)
    out = out.reshape(*batch, q_len, heads, dim)
    row_live = None
    if live is not None:
        # (batch..., 1 or heads, q_len) -> (batch..., q_len, heads)
        row_live = jnp.broadcast_to(jnp.swapaxes(live, -1, -2), (*batch, q_len, heads))
        out = jnp.where(row_live[..., None], out, 0)
    if lse is None:
        return out
    lse = lax.stop_gradient(lse.reshape(*batch, q_len, heads).astype(inputs.key.dtype))
    if row_live is not None:
        lse = jnp.where(row_live, lse, -jnp.inf)
    return out, lse


def _refuse(
    inputs: Inputs, settings: Settings, custom_einsum: bool, sows: bool, want_lse: bool
) -> None:
    """Raise for what cuDNN cannot compute with stablelayers' semantics."""
    reasons = []
    if inputs.sink is not None:
        reasons.append("attention sinks (cuDNN's softmax has no extra logit)")
    if settings.dropout is not None:
        reasons.append("dropout (cuDNN draws its own pattern, not stablelayers')")
    if settings.soft_cap is not None:
        reasons.append("logits_soft_cap (not in jax.nn's cuDNN call)")
    if custom_einsum:
        reasons.append("custom einsums or einsum_dot_general (cuDNN runs its own)")
    if sows:
        reasons.append("module / sow_weights (cuDNN never forms the weights)")
    if want_lse:
        reasons.append(
            "return_logsumexp (cuDNN's is rounded to the output dtype and has no "
            "gradient; return_residual is that, and is supported)"
        )
    if settings.precision is not None:
        reasons.append("precision (cuDNN chooses its own)")
    if inputs.value.shape[-1] != inputs.query.shape[-1]:
        reasons.append("a value head dimension other than the query's")
    if settings.lookahead and not settings.is_causal:
        reasons.append(
            "local_window_size with a right (look-ahead) window without is_causal "
            "(cuDNN's sliding window looks back only)"
        )
    if forward_mode_enabled():
        reasons.append("forward mode (cuDNN has a reverse-mode rule only)")
    dtype = inputs.query.dtype
    if BACKEND == "cudnn" and dtype not in (jnp.float16, jnp.bfloat16):
        reasons.append(f"{dtype} inputs (cuDNN takes float16 or bfloat16: pass dtype=)")
    if reasons:
        raise ValueError(
            "implementation='cudnn' cannot give stablelayers' results with "
            + "; ".join(reasons)
            + f". {_OTHERS[0].upper()}{_OTHERS[1:]}, which support all of these."
        )


def _window(settings: Settings) -> tuple[int | None, int]:
    """jax.nn's ``(left, right)``; under ``is_causal`` the right half is moot, and jax.nn
    passes cuDNN a window only when it is 0 there."""
    if settings.window is None:
        return None, 0
    right = 0 if settings.is_causal or settings.lookahead is None else settings.lookahead
    return settings.window - 1, right


def _live_rows(
    inputs: Inputs,
    settings: Settings,
    batch: tuple[int, ...],
    heads: int,
    q_len: int,
    kv_len: int,
) -> jax.Array | None:
    """Which query rows see at least one key, ``(batch..., 1 or heads, q_len)``, or
    ``None`` when all do. Without a mask or bias, from each row's range of visible keys
    (no ``q_len x kv_len`` array); with one, reduced from the whole visibility."""
    if inputs.mask is not None or inputs.bias is not None:
        _, where = dense_mask(inputs, settings, (*batch, heads, q_len, kv_len))
        if inputs.bias is not None:
            where = both(where, inputs.bias > -jnp.inf)
        assert where is not None
        full = jnp.broadcast_to(where, (*batch, heads, q_len, kv_len))
        return jnp.any(full, axis=-1)
    if not (settings.is_causal or settings.window is not None) and (
        inputs.q_lengths is None and inputs.kv_lengths is None
    ):
        return None
    q_pos = jnp.arange(q_len, dtype=jnp.int32)
    last = (
        jnp.full(batch, kv_len, jnp.int32) if inputs.kv_lengths is None else inputs.kv_lengths
    )
    hi = jnp.broadcast_to(last[..., None] - 1, (*batch, q_len))
    if settings.is_causal:
        hi = jnp.minimum(hi, q_pos)
    if settings.lookahead is not None:
        hi = jnp.minimum(hi, q_pos + settings.lookahead)
    lo = q_pos * 0 if settings.window is None else jnp.maximum(q_pos - settings.window + 1, 0)
    live = lo <= hi
    if inputs.q_lengths is not None:
        live = live & (q_pos < inputs.q_lengths[..., None])
    return live[..., None, :]


def _finite(bias: jax.Array) -> jax.Array:
    """``-inf`` bias entries as a large finite negative: exp of it is 0 beside any live
    logit, as exp(-inf) is, and a dead row (zeroed afterwards) stays finite in the
    backward pass. Half of the number jax.nn's cuDNN call fills masked logits with,
    so that adding the two stays finite in float16."""
    floor = -(2.0**14) if bias.dtype == jnp.float16 else -(2.0**40)
    return jnp.maximum(bias, jnp.asarray(floor, bias.dtype))


def _four_d(
    array: jax.Array | None,
    batch: tuple[int, ...],
    flat: int,
    heads: int,
    q_len: int,
    kv_len: int,
) -> jax.Array | None:
    """A bias or mask broadcastable to ``(batch..., heads, q_len, kv_len)`` as cuDNN's
    ``(B or 1, heads or 1, q_len, kv_len)``: cuDNN reads the two lengths whole."""
    if array is None:
        return None
    full_rank = array.reshape((1,) * (len(batch) + 3 - array.ndim) + array.shape)
    one_batch = all(n == 1 for n in full_rank.shape[: len(batch)])
    n_heads = 1 if full_rank.shape[-3] == 1 else heads
    target = (*((1,) * len(batch) if one_batch else batch), n_heads, q_len, kv_len)
    return jnp.broadcast_to(full_rank, target).reshape(
        1 if one_batch else flat, n_heads, q_len, kv_len
    )


def _flat_lengths(lengths: jax.Array | None, flat: int) -> jax.Array | None:
    """Lengths of shape ``batch`` as jax.nn's int32 ``(B,)``."""
    return None if lengths is None else lengths.reshape(flat)
