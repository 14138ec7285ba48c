"""Dot-product attention on top of :func:`stablelayers.masked_softmax`.

Nothing here imports a framework: the function is a drop-in ``attention_fn`` for Flax Linen
and Flax NNX, and the Equinox layer calls it directly. It only composes einsums, the mask,
dropout and the core's masked softmax; the softmax math lives in ``_core``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from stablelayers import _checks, _core
from stablelayers._functions import masked_softmax

Einsum = Callable[..., jax.Array]


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    sink: ArrayLike | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    broadcast_dropout: bool = True,
    deterministic: bool = True,
    dtype: DTypeLike | None = None,
    precision: jax.lax.PrecisionLike = None,
    module: Any = None,
    qk_attn_weights_einsum: Einsum | None = None,
    attn_weights_value_einsum: Einsum | None = None,
) -> jax.Array:
    r"""Scaled dot-product attention in which a query that may attend nothing gets exactly 0.

    .. math::
        \mathrm{out}_q = \sum_k p_{qk} v_k, \qquad
        p_{qk} = \frac{\exp(s_{qk})}{\exp(\mathrm{sink}) + \sum_{k'} \exp(s_{qk'})}, \qquad
        s_{qk} = \mathrm{scale} \cdot q \cdot k + \mathrm{bias}_{qk}

    with masked keys left out of the sum (:func:`stablelayers.masked_softmax`). Where
    Flax and ``jax.nn`` fill masked logits with a large negative number, so that a query
    row with every key masked (padding, or a causal mask over left padding) becomes the
    uniform average of all values and passes gradient to them, here that row is exactly 0
    and contributes exactly 0 to every gradient. Rows with at least one key agree with
    :func:`flax.linen.dot_product_attention` to float rounding.

    The layout is Flax's and ``jax.nn.dot_product_attention``'s, and every keyword that
    :class:`flax.linen.MultiHeadDotProductAttention` and :class:`flax.nnx.MultiHeadAttention`
    pass to their ``attention_fn`` is honoured, so either accepts
    ``attention_fn=stablelayers.dot_product_attention``.

    Args:
        query: shape ``(batch..., q_len, heads, qk_dim)``. Any number of batch dimensions,
            including none.
        key: shape ``(batch..., kv_len, kv_heads, qk_dim)``; ``heads`` must be a multiple
            of ``kv_heads`` (grouped-query attention when they differ).
        value: shape ``(batch..., kv_len, kv_heads, v_dim)``.
        bias: optional, added to the logits; broadcastable to
            ``(batch..., heads, q_len, kv_len)``. A ``-inf`` bias masks that entry.
        mask: optional, broadcastable to ``(batch..., heads, q_len, kv_len)``; ``False``
            (or 0, for the float masks of ``flax.linen.make_attention_mask``) leaves a key
            out.
        sink: optional learned sink logits, broadcastable to ``(batch..., heads)``, e.g.
            shape ``(heads,)`` for one per head as in gpt-oss: an extra logit in each
            row's normaliser that takes attention mass without contributing a value.
            Differentiable.
        scale: multiplies the logits; defaults to ``1 / sqrt(qk_dim)``.
        is_causal: also mask key ``k`` from query ``q`` when ``k > q`` (the lower-triangular
            mask aligned at the top left, as in Flax).
        dropout_rng: PRNG key for dropout on the attention weights; needed when dropout is
            active.
        dropout_rate: probability of dropping an attention weight (kept weights are scaled
            by ``1 / (1 - dropout_rate)``).
        broadcast_dropout: use one dropout pattern for all batch entries and heads.
        deterministic: if ``True``, no dropout.
        dtype: the computation dtype: ``query``, ``key`` and ``value`` are cast to it.
            Defaults to their promoted dtype. float16 and bfloat16 logits and softmax are
            computed in float32 whatever the dtype; the output is in ``dtype``.
        precision: ``jax.lax.Precision`` for both einsums.
        module: a Flax Linen or NNX module to sow the attention weights (before dropout)
            into, as ``'intermediates'`` / ``'attention_weights'``; Flax passes it when
            called with ``sow_weights=True``.
        qk_attn_weights_einsum: replaces ``jnp.einsum`` for the logits (Flax Linen passes
            it for quantised einsums); called as ``einsum("...qhd,...khd->...hqk", q, k)``.
            Must be given together with ``attn_weights_value_einsum``, and not with
            ``precision``.
        attn_weights_value_einsum: replaces ``jnp.einsum`` for the weighted sum; called as
            ``einsum("...hqk,...khd->...qhd", weights, value)``.

    Returns:
        An array of shape ``(batch..., q_len, heads, v_dim)`` and dtype ``dtype``. A query
        row whose keys are all masked is exactly 0.

    Raises:
        ValueError: the shapes of ``query``, ``key``, ``value``, ``bias``, ``mask`` or
            ``sink`` do not fit together, ``dropout_rate`` is not in ``[0, 1)``, dropout
            is active without a ``dropout_rng``, or custom einsums are given with
            ``precision`` or only one of them.
        TypeError: ``query``, ``key`` or ``value`` is not a real floating (or integer)
            array.
    """
    if (qk_attn_weights_einsum is None) != (attn_weights_value_einsum is None):
        raise ValueError(
            "`qk_attn_weights_einsum` and `attn_weights_value_einsum` must be given together."
        )
    custom_einsum = qk_attn_weights_einsum is not None
    if custom_einsum and precision is not None:
        raise ValueError(
            "`precision` and custom einsums are mutually exclusive; set the precision "
            "inside the einsums."
        )
    query, key, value = (
        _checks.as_float_array(a, name)
        for a, name in ((query, "query"), (key, "key"), (value, "value"))
    )
    if dtype is None:
        dtype = jnp.result_type(query.dtype, key.dtype, value.dtype)
    dtype = jnp.dtype(dtype)
    query, key, value = query.astype(dtype), key.astype(dtype), value.astype(dtype)
    batch, q_len, heads, kv_len, kv_heads = _check_shapes(query, key, value)
    logits_shape = (*batch, heads, q_len, kv_len)
    if isinstance(dropout_rate, (int, float)) and not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout_rate}.")
    # A traced rate (an Equinox Dropout's ``p`` may be an array) counts as active.
    dropout_on = not deterministic and (
        not isinstance(dropout_rate, (int, float)) or dropout_rate > 0.0
    )
    if dropout_on and dropout_rng is None:
        raise ValueError(
            f"Dropout is active (dropout_rate={dropout_rate}, deterministic=False) but "
            "`dropout_rng` is None; pass a PRNG key or set deterministic=True."
        )
    # Logits and softmax in at least float32: float16 logits overflow at |s| > 65504 and
    # bfloat16 ones carry 3 significant digits.
    compute = _core.compute_dtype(dtype)
    groups = heads // kv_heads
    if custom_einsum and groups > 1:
        # A custom einsum only promises Flax's two subscripts, so expand the kv heads.
        key, value = jnp.repeat(key, groups, axis=-2), jnp.repeat(value, groups, axis=-2)
        kv_heads, groups = heads, 1

    if custom_einsum:
        logits = qk_attn_weights_einsum("...qhd,...khd->...hqk", query, key).astype(compute)
    else:
        grouped_query = query.reshape(*batch, q_len, kv_heads, groups, query.shape[-1])
        logits = jnp.einsum(
            "...qhgd,...khd->...hgqk",
            grouped_query,
            key,
            precision=precision,
            preferred_element_type=compute,
        ).reshape(logits_shape)
    if scale is None:
        scale = 1.0 / float(query.shape[-1]) ** 0.5
    logits = logits * jnp.asarray(scale, compute)
    if bias is not None:
        bias = jnp.asarray(bias)
        _check_broadcast("bias", bias.shape, logits_shape)
        logits = logits + bias.astype(compute)

    where = _combine_masks(mask, is_causal, logits_shape)
    if sink is not None:
        sink = _checks.as_float_array(sink, "sink")
        _check_broadcast("sink", sink.shape, (*batch, heads), "(batch..., heads)")
        sink = sink.astype(compute)[..., None]
    weights = masked_softmax(logits, where=where, sink=sink)

    if module is not None:
        # The string names the same collection in Linen and NNX (nnx.Intermediate).
        module.sow("intermediates", "attention_weights", weights.astype(dtype))
    if dropout_on:
        keep_prob = 1.0 - jax.lax.stop_gradient(dropout_rate)
        # Flax's pattern: with broadcast_dropout, one (q_len, kv_len) draw for all batch
        # entries and heads; the same key therefore drops the same weights as Flax.
        shape = (1,) * (len(batch) + 1) + (q_len, kv_len) if broadcast_dropout else None
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape or logits_shape)
        weights = weights * (keep.astype(compute) / jnp.asarray(keep_prob, compute))

    if custom_einsum:
        out = attn_weights_value_einsum("...hqk,...khd->...qhd", weights.astype(dtype), value)
        return out.astype(dtype)
    grouped_weights = weights.astype(dtype).reshape(*batch, kv_heads, groups, q_len, kv_len)
    out = jnp.einsum(
        "...hgqk,...khd->...qhgd",
        grouped_weights,
        value,
        precision=precision,
        preferred_element_type=compute,
    )
    return out.reshape(*batch, q_len, heads, value.shape[-1]).astype(dtype)


def _check_shapes(query, key, value):
    if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
        raise ValueError(
            "`query`, `key` and `value` must have the same rank, at least 3 "
            "(batch..., length, heads, head_dim); got shapes "
            f"{query.shape}, {key.shape}, {value.shape}."
        )
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(
            "`query`, `key` and `value` must have the same batch dimensions; got shapes "
            f"{query.shape}, {key.shape}, {value.shape}."
        )
    *batch, q_len, heads, qk_dim = query.shape
    kv_len, kv_heads, _ = key.shape[-3:]
    if key.shape[-1] != qk_dim:
        raise ValueError(
            f"`query` and `key` head dimensions differ: {qk_dim} and {key.shape[-1]}."
        )
    if value.shape[-3:-1] != (kv_len, kv_heads):
        raise ValueError(
            "`key` and `value` must agree in length and number of heads; got shapes "
            f"{key.shape} and {value.shape}."
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"`query` has {heads} heads, which is not a multiple of the {kv_heads} heads "
            "of `key` and `value`."
        )
    return tuple(batch), q_len, heads, kv_len, kv_heads


def _check_broadcast(name, shape, target, layout="(batch..., heads, q_len, kv_len)"):
    if not _checks.broadcasts_to(tuple(shape), target):
        raise ValueError(
            f"`{name}` of shape {tuple(shape)} does not broadcast to {target}, which is "
            f"{layout} for these inputs."
        )


def _combine_masks(mask, is_causal, logits_shape):
    where = None
    if mask is not None:
        mask = jnp.asarray(mask)
        _check_broadcast("mask", mask.shape, logits_shape)
        # Flax's make_attention_mask returns float 0/1 masks by default.
        where = mask if mask.dtype == jnp.bool_ else mask != 0
    if is_causal:
        q_len, kv_len = logits_shape[-2:]
        causal = jnp.tril(jnp.ones((q_len, kv_len), dtype=jnp.bool_))
        where = causal if where is None else where & causal
    return where
