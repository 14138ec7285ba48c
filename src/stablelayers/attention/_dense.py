"""The dense path of ``dot_product_attention``: the ``(batch..., heads, q_len, kv_len)``
logits formed whole, masked, through :func:`stablelayers.masked_softmax`, and onto the
values. The path for short sequences, custom einsums and sown weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.arithmetic import compute_dtype
from stablelayers.attention._arguments import Inputs, Settings
from stablelayers.attention._masks import dense_mask
from stablelayers.ops import _softmax
from stablelayers.ops._logsumexp import lse_rows

Einsum = Callable[..., jax.Array]


def dense(
    inputs: Inputs,
    settings: Settings,
    *,
    qk_einsum: Einsum | None,
    wv_einsum: Einsum | None,
    dot_general: Callable[..., jax.Array] | None,
    module: Any,
    sown_dtype: jnp.dtype,
    want_lse: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """``(out, lse)`` on ``dot_product_attention``'s checked arguments: ``out`` as
    ``(batch..., q_len, heads, v_dim)``, and with ``want_lse`` the logsumexp of each row's
    logits (sink included) as ``(batch..., heads, q_len)``, ``-inf`` for an empty row."""
    batch = inputs.query.shape[:-3]
    q_len, heads, _ = inputs.query.shape[-3:]
    kv_len, kv_heads, _ = inputs.key.shape[-3:]
    logits_shape = (*batch, heads, q_len, kv_len)
    inputs, where = dense_mask(inputs, settings, logits_shape)
    query, key, value = inputs.query, inputs.key, inputs.value
    bias, sink = inputs.bias, inputs.sink
    scale, precision, dropout = settings.scale, settings.precision, settings.dropout
    dtype = query.dtype
    compute = compute_dtype(dtype)
    groups = heads // kv_heads
    if qk_einsum is not None and groups > 1:
        # A custom einsum only promises Flax's two subscripts, so expand the kv heads.
        key, value = jnp.repeat(key, groups, axis=-2), jnp.repeat(value, groups, axis=-2)
        kv_heads, groups = heads, 1

    if qk_einsum is not None:
        logits = qk_einsum("...qhd,...khd->...hqk", query, key).astype(compute)
    else:
        grouped_query = query.reshape(*batch, q_len, kv_heads, groups, query.shape[-1])
        logits = jnp.einsum(
            "...qhgd,...khd->...hgqk",
            grouped_query,
            key,
            precision=precision,
            preferred_element_type=compute,
            _dot_general=dot_general or lax.dot_general,
        ).reshape(logits_shape)
    logits = logits * jnp.asarray(scale, compute)
    if settings.soft_cap is not None:
        # Gemma 2's soft cap on the scaled logits; a bias (ALiBi's, or a -inf that masks)
        # is added after it, as FlashAttention adds ALiBi after its softcap.
        cap = jnp.asarray(settings.soft_cap, compute)
        logits = cap * jnp.tanh(logits / cap)
    if bias is not None:
        logits = logits + bias.astype(compute)

    # One sink per (batch, head), broadcast to each query row as the softmax keeps it.
    row_sink = (
        None
        if sink is None
        else jnp.broadcast_to(sink[..., None, None], (*logits_shape[:-1], 1))
    )
    weights = _softmax.apply(logits, where, row_sink, (logits.ndim - 1,))
    lse = _logsumexp(logits, where, row_sink) if want_lse else None

    if module is not None:
        # The string names the same collection in Linen and NNX (nnx.Intermediate).
        module.sow("intermediates", "attention_weights", weights.astype(sown_dtype))
    if dropout is not None:
        rng, rate, broadcast = dropout
        keep_prob = 1.0 - lax.stop_gradient(rate)
        # Flax's pattern: with broadcast_dropout, one (q_len, kv_len) draw for all batch
        # entries and heads; the same key therefore drops the same weights as Flax.
        shape = (1,) * (len(batch) + 1) + (q_len, kv_len) if broadcast else logits_shape
        keep = jax.random.bernoulli(rng, keep_prob, shape)
        weights = weights * (keep.astype(compute) / jnp.asarray(keep_prob, compute))

    if wv_einsum is not None:
        out = wv_einsum("...hqk,...khd->...qhd", weights.astype(dtype), value).astype(dtype)
        return out, lse
    grouped_weights = weights.astype(dtype).reshape(*batch, kv_heads, groups, q_len, kv_len)
    out = jnp.einsum(
        "...hgqk,...khd->...qhgd",
        grouped_weights,
        value,
        precision=precision,
        preferred_element_type=compute,
        _dot_general=dot_general or lax.dot_general,
    )
    return out.reshape(*batch, q_len, heads, value.shape[-1]).astype(dtype), lse


def _logsumexp(logits: jax.Array, where: jax.Array | None, sink: jax.Array | None) -> jax.Array:
    """``log(exp(sink) + sum of exp over the unmasked logits)`` per row, ``-inf`` for a row
    with nothing: the sink (``(..., q_len, 1)``) is one more entry of the row, always
    unmasked."""
    if sink is not None:
        row_shape = (*logits.shape[:-1], 1)
        live = jnp.ones(logits.shape, bool) if where is None else where
        where = jnp.concatenate(
            [jnp.broadcast_to(live, logits.shape), jnp.ones(row_shape, bool)], axis=-1
        )
        logits = jnp.concatenate([logits, sink], axis=-1)
    if logits.shape[-1] == 0:
        return jnp.full(logits.shape[:-1], -jnp.inf, logits.dtype)
    lse, _ = lse_rows(logits, where, None, (logits.ndim - 1,), None)
    return lse[..., 0]
