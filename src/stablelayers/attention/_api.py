"""Dot-product attention on top of :func:`stablelayers.masked_softmax`.

Nothing here imports a framework: the function is a drop-in ``attention_fn`` for Flax Linen
and Flax NNX, and the Equinox layer calls it directly. It only composes einsums, the mask,
dropout and the masked softmax: the checks are in ``_arguments``, the masks in
``_masks``, and the two paths in ``_dense`` and ``_chunked_layout``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from stablelayers._core import checks
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.attention import _layer_segments
from stablelayers.attention._arguments import (
    Inputs,
    Settings,
    check_arrays,
    check_broadcast,
    check_lengths,
    check_segment_ids,
    check_shapes,
    check_sink,
    check_soft_cap,
    implementation_name,
    local_window,
    scale_or_default,
    use_chunked,
)
from stablelayers.attention._chunked_layout import chunked, public_logsumexp
from stablelayers.attention._cudnn import cudnn_attention
from stablelayers.attention._dense import dense

Einsum = Callable[..., jax.Array]


# Overloads for type checkers: the pair comes back only when one is asked for. The
# implementation's signature below is the one that lists (and checks) every argument.
@overload
def dot_product_attention(
    *args: Any, return_logsumexp: Literal[True], **kwargs: Any
) -> tuple[jax.Array, jax.Array]: ...


@overload
def dot_product_attention(
    *args: Any, return_residual: Literal[True], **kwargs: Any
) -> tuple[jax.Array, jax.Array]: ...


@overload
def dot_product_attention(*args: Any, **kwargs: Any) -> jax.Array: ...


# The overloads take any arguments, which no real signature does (hence the ignore).
@allow_rank_promotion  # type: ignore[misc]
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
    implementation: str | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    return_residual: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., jax.Array] | None = None,
    return_logsumexp: bool = False,
    segment_ids: ArrayLike | None = None,
    query_segment_ids: ArrayLike | None = None,
    key_value_segment_ids: ArrayLike | None = None,
    logits_soft_cap: float | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Scaled dot-product attention in which a query that may attend nothing gets exactly 0.

    .. math::
        \mathrm{out}_q = \sum_k p_{qk} v_k, \qquad
        p_{qk} = \frac{\exp(s_{qk})}{\exp(\mathrm{sink}) + \sum_{k'} \exp(s_{qk'})}, \qquad
        s_{qk} = \mathrm{scale} \cdot q \cdot k + \mathrm{bias}_{qk}

    (with ``logits_soft_cap`` ``c``, ``s_{qk} = c \tanh(\mathrm{scale}\, q \cdot k / c) +
    \mathrm{bias}_{qk}``)
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

    Two implementations give the same results (to float rounding). The dense one forms the
    ``(batch..., heads, q_len, kv_len)`` logits. The chunked one walks the keys in blocks
    with a running maximum and normaliser per query row (the online softmax, in float32),
    and its ``custom_vjp`` keeps only the output and one logsumexp per query row, the
    backward pass recomputing each block's probabilities (FlashAttention-2's): memory
    linear in the length, and blocks that ``is_causal``, ``local_window_size`` or the
    lengths remove entirely are skipped. By default the chunked path is taken from
    ``q_len * kv_len >= 1024 * 1024`` on, unless custom einsums or ``module`` ask for the
    weights or :func:`stablelayers.forward_mode` is on (the chunked path has no
    forward-mode rule).

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
        implementation: ``"dense"``, ``"chunked"``, or ``None`` to choose by size (see
            above; never ``"cudnn"``; jax.nn's ``"xla"`` is ``None``). Custom einsums and
            ``module`` (``sow_weights``) need the attention weights, so they take the
            dense path; forcing ``"chunked"`` with them raises. ``"cudnn"`` (on an NVIDIA
            GPU) calls ``jax.nn.dot_product_attention(implementation="cudnn")`` with
            these semantics laid on top: a row that sees no key is exactly 0 with no
            gradient, padding is zeroed so its NaN cannot leak; lengths, ``is_causal``,
            ``local_window_size`` (looking back only, unless ``is_causal``), ``mask``,
            ``bias`` (cast to the inputs' dtype; ``-inf`` masks), segment ids (as an
            ``L x L`` mask) and ``return_residual``. Inputs must be float16 or bfloat16
            (``dtype=``), ``v_dim == qk_dim``, and the head dimension one cuDNN takes.
            Sinks, dropout, ``logits_soft_cap``, custom einsums, ``module``,
            ``precision``, ``return_logsumexp`` and forward mode raise a ``ValueError``
            at trace time naming the other implementations.
        chunk_size: the chunked path's block sizes, an int for both or ``(query block,
            key block)``; default ``(256, 512)``, measured on CPU. Lengths need not be
            multiples: the inputs are padded internally.
        query_seq_lengths: optional int array broadcastable to ``(batch...)`` (jax.nn's
            name): queries at index ``>= query_seq_lengths`` attend nothing (their output
            is 0). Padding without an ``L x L`` mask.
        key_value_seq_lengths: optional int array broadcastable to ``(batch...)``: keys
            at index ``>= key_value_seq_lengths`` are masked.
        local_window_size: optional sliding window, jax.nn's: an int ``w`` for
            ``(w, w)``, or ``(left, right)``: query ``q`` sees keys ``q - left`` to
            ``q + right``. With ``is_causal``, ``(w - 1, 0)`` is each query's last ``w``
            keys, itself included.
        return_residual: also return jax.nn's residual: the logsumexp of each query
            row's logits (sink included), shape ``(batch..., q_len, heads)``, in the
            key's dtype, gradient stopped; ``-inf`` for a row that attends nothing.
        force_fp32_for_softmax: Flax's; the softmax is always at least float32 here, so
            it only makes ``module`` sow the weights in float32.
        einsum_dot_general: Flax's ``dot_general`` for both einsums; like custom
            einsums, it takes the dense path.
        return_logsumexp: also return the float32 logsumexp of each query row's logits
            (sink included), shape ``(batch..., heads, q_len)``; ``-inf`` for a row that
            attends nothing. Differentiable, unlike ``return_residual``'s; give one of
            the two.
        segment_ids: optional int array broadcastable to ``(batch..., q_len)`` for
            packed sequences in self-attention (``q_len == kv_len``): query ``q`` sees
            key ``k`` only when ``segment_ids[q] == segment_ids[k]``, on top of every
            other mask. No ``L x L`` mask is formed on the chunked path, and its block
            pairs that share no segment are skipped. Ids are compared for equality only,
            so padding with one id attends itself; give it an id no query or no key has
            (see the pair below), or use the lengths, to make it attend nothing.
        query_segment_ids: with ``key_value_segment_ids``, the ids of the queries,
            ``(batch..., q_len)``, when queries and keys differ (cross-attention,
            decoding); the names follow ``query_seq_lengths``. A query whose id no key
            has gives exactly 0 and no gradient.
        key_value_segment_ids: the ids of the keys, ``(batch..., kv_len)``.
        logits_soft_cap: optional positive Python float ``c``: the scaled logits become
            ``c * tanh(s / c)`` before the bias, masks and sinks (Gemma 2, arXiv:2408.00118,
            section 2; FlashAttention's ``softcap``); on every path, with exact gradients.

    On the chunked path, dropout draws each block's keep pattern from
    ``fold_in(fold_in(dropout_rng, query_block), key_block)``: the same distribution as
    the dense path, not the same pattern for the same key. A ``mask`` or ``bias`` is
    read block by block, but a full ``(q_len, kv_len)`` one is itself quadratic in
    memory; prefer ``is_causal``, ``local_window_size`` and the lengths at long context.

    Returns:
        An array of shape ``(batch..., q_len, heads, v_dim)`` and dtype ``dtype``. A query
        row whose keys are all masked is exactly 0. With ``return_residual`` or
        ``return_logsumexp``, the pair ``(out, residual)`` or ``(out, logsumexp)``.

    Raises:
        ValueError: the shapes of ``query``, ``key``, ``value``, ``bias``, ``mask`` or
            ``sink`` do not fit together, ``dropout_rate`` is not in ``[0, 1)``, dropout
            is active without a ``dropout_rng``, custom einsums are given with
            ``precision`` or only one of them, ``implementation`` is unknown or
            ``"chunked"`` with custom einsums or ``module``, ``local_window_size`` is
            negative, ``chunk_size`` is not positive, both ``return_residual`` and
            ``return_logsumexp`` are asked for, ``segment_ids`` is given with the pair or
            for ``q_len != kv_len``, only one of the pair is given, the ids do not
            broadcast, or ``logits_soft_cap`` is not positive.
        TypeError: ``query``, ``key`` or ``value`` is not a real floating (or integer)
            array, the lengths or segment ids are not integers, or ``logits_soft_cap``
            is traced.
    """
    window, lookahead = (
        (None, None) if local_window_size is None else local_window(local_window_size)
    )
    implementation = implementation_name(implementation)
    if return_residual and return_logsumexp:
        raise ValueError(
            "`return_residual` (jax.nn's: shape (batch..., q_len, heads), the key's "
            "dtype, gradient stopped) and `return_logsumexp` (shape (batch..., heads, "
            "q_len), float32, differentiable) return the same values; ask for one."
        )
    want_lse = return_logsumexp or return_residual
    if (qk_attn_weights_einsum is None) != (attn_weights_value_einsum is None):
        raise ValueError(
            "`qk_attn_weights_einsum` and `attn_weights_value_einsum` must be given together."
        )
    custom_einsum = qk_attn_weights_einsum is not None
    if custom_einsum and (precision is not None or einsum_dot_general is not None):
        raise ValueError(
            "`precision` and `einsum_dot_general` are mutually exclusive with custom "
            "einsums; set them inside the einsums."
        )
    query, key, value = check_arrays(query, key, value, dtype)
    dtype = query.dtype
    batch, q_len, heads, kv_len, _ = check_shapes(query, key, value)
    logits_shape = (*batch, heads, q_len, kv_len)
    rate = checks.concrete_number(dropout_rate, "dropout_rate")
    if rate is not None and not 0.0 <= rate < 1.0:
        raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout_rate!r}.")
    # A traced rate (an Equinox Dropout's ``p`` may be an array) counts as active.
    dropout_on = not deterministic and (rate is None or rate > 0.0)
    if dropout_on and dropout_rng is None:
        raise ValueError(
            f"Dropout is active (dropout_rate={dropout_rate}, deterministic=False) but "
            "`dropout_rng` is None; pass a PRNG key or set deterministic=True."
        )
    scale = scale_or_default(scale, query.shape[-1])
    soft_cap = check_soft_cap(logits_soft_cap)
    explicit = (segment_ids, query_segment_ids, key_value_segment_ids)
    handed = _layer_segments.take()
    if handed:
        if any(ids is not None for ids in explicit):
            raise ValueError(
                "Segment ids were given both to the attention layer and to "
                "dot_product_attention; give them once."
            )
        explicit = (
            handed.get("segment_ids"),
            handed.get("query_segment_ids"),
            handed.get("key_value_segment_ids"),
        )
    q_segments, kv_segments = check_segment_ids(*explicit, batch, q_len, kv_len)
    if sink is not None:
        sink = check_sink(sink, batch, heads, dtype)
    lengths = (
        check_lengths(query_seq_lengths, "query_seq_lengths", batch),
        check_lengths(key_value_seq_lengths, "key_value_seq_lengths", batch),
    )
    use_chunks = use_chunked(
        implementation,
        q_len,
        kv_len,
        custom_einsum or einsum_dot_general is not None,
        module is not None,
    )
    if bias is not None:
        bias = jnp.asarray(bias)
        check_broadcast("bias", bias.shape, logits_shape)
    if mask is not None:
        mask = jnp.asarray(mask)
        check_broadcast("mask", mask.shape, logits_shape)
        # Flax's make_attention_mask returns float 0/1 masks by default.
        mask = mask if mask.dtype == jnp.bool_ else mask != 0
    dropout = None
    if dropout_on:
        assert dropout_rng is not None  # checked above whenever dropout is on
        dropout = (dropout_rng, dropout_rate, broadcast_dropout)
    inputs = Inputs(
        query,
        key,
        value,
        bias,
        mask,
        sink,
        *lengths,
        q_segments=q_segments,
        kv_segments=kv_segments,
    )
    settings = Settings(scale, is_causal, window, lookahead, precision, dropout, soft_cap)
    if implementation == "cudnn":
        return cudnn_attention(
            inputs,
            settings,
            custom_einsum=custom_einsum or einsum_dot_general is not None,
            sows=module is not None,
            return_logsumexp=return_logsumexp,
            return_residual=return_residual,
        )
    if use_chunks:
        out, lse = chunked(inputs, settings, chunk_size)
        if not want_lse:
            return out
        lse = public_logsumexp(lse, batch)
        return _with_logsumexp(out, lse, return_residual, key.dtype)

    out, dense_lse = dense(
        inputs,
        settings,
        qk_einsum=qk_attn_weights_einsum,
        wv_einsum=attn_weights_value_einsum,
        dot_general=einsum_dot_general,
        module=module,
        # As in Flax, force_fp32_for_softmax sows the weights as the softmax made them
        # (float32; here they always are).
        sown_dtype=jnp.dtype(jnp.float32 if force_fp32_for_softmax else dtype),
        want_lse=want_lse,
    )
    if dense_lse is None:
        return out
    return _with_logsumexp(out, dense_lse, return_residual, key.dtype)


def _with_logsumexp(
    out: jax.Array, lse: jax.Array, as_residual: bool, key_dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)``, or with ``as_residual`` jax.nn's residual: the logsumexp in the
    key's dtype, shape ``(batch..., q_len, heads)``, gradient stopped."""
    if not as_residual:
        return out, lse
    return out, lax.stop_gradient(jnp.swapaxes(lse, -1, -2).astype(key_dtype))
