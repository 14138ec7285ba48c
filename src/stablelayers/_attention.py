"""Dot-product attention on top of :func:`stablelayers.masked_softmax`.

Nothing here imports a framework: the function is a drop-in ``attention_fn`` for Flax Linen
and Flax NNX, and the Equinox layer calls it directly. It only composes einsums, the mask,
dropout and the core's masked softmax; the softmax math lives in ``_core``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from stablelayers import _checks, _chunked_attention, _float_arithmetic
from stablelayers._rank_promotion import allow_rank_promotion
from stablelayers._softmax import masked_softmax
from stablelayers._switches import forward_mode_enabled

Einsum = Callable[..., jax.Array]


@overload
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
    query_lengths: ArrayLike | None = None,
    key_lengths: ArrayLike | None = None,
    window: int | None = None,
    implementation: str | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    return_residual: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., jax.Array] | None = None,
    return_logsumexp: Literal[False] = False,
) -> jax.Array: ...


@overload
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
    query_lengths: ArrayLike | None = None,
    key_lengths: ArrayLike | None = None,
    window: int | None = None,
    implementation: str | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    return_residual: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., jax.Array] | None = None,
    return_logsumexp: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@allow_rank_promotion
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
    query_lengths: ArrayLike | None = None,
    key_lengths: ArrayLike | None = None,
    window: int | None = None,
    implementation: str | None = None,
    chunk_size: int | tuple[int, int] | None = None,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    return_residual: bool = False,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., jax.Array] | None = None,
    return_logsumexp: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
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

    Two implementations give the same results (to float rounding). The dense one forms the
    ``(batch..., heads, q_len, kv_len)`` logits. The chunked one walks the keys in blocks
    with a running maximum and normaliser per query row (the online softmax, in float32),
    and its ``custom_vjp`` keeps only the output and one logsumexp per query row, the
    backward pass recomputing each block's probabilities (FlashAttention-2's): memory
    linear in the length, and blocks that ``is_causal``, ``window`` or the lengths remove
    entirely are skipped. By default the chunked path is taken from ``q_len * kv_len >=
    1024 * 1024`` on, unless custom einsums or ``module`` ask for the weights or
    :func:`stablelayers.forward_mode` is on (the chunked path has no forward-mode rule).

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
        query_lengths: optional int array broadcastable to ``(batch...)``: queries at
            index ``>= query_lengths`` attend nothing (their output is 0). Padding
            without an ``L x L`` mask.
        key_lengths: optional int array broadcastable to ``(batch...)``: keys at index
            ``>= key_lengths`` are masked.
        window: optional sliding window: key ``k`` is masked from query ``q`` when
            ``q - k >= window``; with ``is_causal``, each query sees its last ``window``
            keys, itself included.
        implementation: ``"dense"``, ``"chunked"``, or ``None`` to choose by size (see
            above). Custom einsums and ``module`` (``sow_weights``) need the attention
            weights, so they take the dense path; forcing ``"chunked"`` with them raises.
        chunk_size: the chunked path's block sizes, an int for both or ``(query block,
            key block)``; default ``(256, 512)``, measured on CPU. Lengths need not be
            multiples: the inputs are padded internally.
        return_logsumexp: also return the float32 logsumexp of each query row's logits
            (sink included), shape ``(batch..., heads, q_len)``; ``-inf`` for a row that
            attends nothing. Differentiable.

    On the chunked path, dropout draws each block's keep pattern from
    ``fold_in(fold_in(dropout_rng, query_block), key_block)``: the same distribution as
    the dense path, not the same pattern for the same key. A ``mask`` or ``bias`` is
    read block by block, but a full ``(q_len, kv_len)`` one is itself quadratic in
    memory; prefer ``is_causal``, ``window`` and the lengths at long context.

    Returns:
        An array of shape ``(batch..., q_len, heads, v_dim)`` and dtype ``dtype``. A query
        row whose keys are all masked is exactly 0. With ``return_logsumexp``, the pair
        ``(out, logsumexp)``.

    Raises:
        ValueError: the shapes of ``query``, ``key``, ``value``, ``bias``, ``mask`` or
            ``sink`` do not fit together, ``dropout_rate`` is not in ``[0, 1)``, dropout
            is active without a ``dropout_rng``, custom einsums are given with
            ``precision`` or only one of them, ``implementation`` is unknown or
            ``"chunked"`` with custom einsums or ``module``, or ``window`` or
            ``chunk_size`` is not positive.
        TypeError: ``query``, ``key`` or ``value`` is not a real floating (or integer)
            array, or the lengths are not integers.
    """
    # jax.nn's and Flax's spellings of what stablelayers also has.
    query_lengths = _either(
        query_lengths, "query_lengths", query_seq_lengths, "query_seq_lengths"
    )
    key_lengths = _either(
        key_lengths, "key_lengths", key_value_seq_lengths, "key_value_seq_lengths"
    )
    lookahead = None
    if local_window_size is not None:
        if window is not None:
            raise ValueError(
                "Give `window` (a look-back) or jax.nn's `local_window_size` "
                "((left, right)), not both."
            )
        window, lookahead = _local_window(local_window_size)
    implementation = _implementation(implementation)
    if return_residual and return_logsumexp:
        raise ValueError(
            "`return_residual` (jax.nn's, shape (batch..., q_len, heads)) and "
            "`return_logsumexp` (shape (batch..., heads, q_len)) return the same values; "
            "ask for one."
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
    rate = _checks.concrete_number(dropout_rate, "dropout_rate")
    if rate is not None and not 0.0 <= rate < 1.0:
        raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout_rate!r}.")
    # A traced rate (an Equinox Dropout's ``p`` may be an array) counts as active.
    dropout_on = not deterministic and (rate is None or rate > 0.0)
    if dropout_on and dropout_rng is None:
        raise ValueError(
            f"Dropout is active (dropout_rate={dropout_rate}, deterministic=False) but "
            "`dropout_rng` is None; pass a PRNG key or set deterministic=True."
        )
    # Logits and softmax in at least float32: float16 logits overflow at |s| > 65504 and
    # bfloat16 ones carry 3 significant digits.
    compute = _float_arithmetic.compute_dtype(dtype)
    if scale is None:
        scale = 1.0 / float(query.shape[-1]) ** 0.5
    if sink is not None:
        sink = _checks.as_float_array(sink, "sink")
        _check_broadcast("sink", sink.shape, (*batch, heads), "(batch..., heads)")
        sink = sink.astype(compute)
    if window is not None:
        window = _checks.positive_int(window, "window")
    lengths = [
        _check_lengths(n, name, batch)
        for n, name in ((query_lengths, "query_lengths"), (key_lengths, "key_lengths"))
    ]
    chunked = _use_chunked(
        implementation, q_len, kv_len, custom_einsum or einsum_dot_general is not None, module
    )
    if bias is not None:
        bias = jnp.asarray(bias)
        _check_broadcast("bias", bias.shape, logits_shape)
    if mask is not None:
        mask = jnp.asarray(mask)
        _check_broadcast("mask", mask.shape, logits_shape)
        # Flax's make_attention_mask returns float 0/1 masks by default.
        mask = mask if mask.dtype == jnp.bool_ else mask != 0
    query, key, value = _silence_dead_rows(query, key, value, mask, *lengths)
    if chunked:
        out, lse = _chunked(
            query,
            key,
            value,
            bias,
            mask,
            sink,
            *lengths,
            scale=scale,
            is_causal=is_causal,
            window=window,
            lookahead=lookahead,
            precision=precision,
            chunk_size=chunk_size,
            dropout=(dropout_rng, dropout_rate, broadcast_dropout) if dropout_on else None,
        )
        if not want_lse:
            return out
        # The chunked path marks an empty row's logsumexp with the lowest float.
        lse = jnp.where(lse == jnp.finfo(lse.dtype).min, -jnp.inf, lse)
        return _with_logsumexp(out, lse, return_residual, key.dtype)

    groups = heads // kv_heads
    if custom_einsum and groups > 1:
        # A custom einsum only promises Flax's two subscripts, so expand the kv heads.
        key, value = jnp.repeat(key, groups, axis=-2), jnp.repeat(value, groups, axis=-2)
        kv_heads, groups = heads, 1

    if qk_attn_weights_einsum is not None:
        logits = qk_attn_weights_einsum("...qhd,...khd->...hqk", query, key).astype(compute)
    else:
        grouped_query = query.reshape(*batch, q_len, kv_heads, groups, query.shape[-1])
        logits = jnp.einsum(
            "...qhgd,...khd->...hgqk",
            grouped_query,
            key,
            precision=precision,
            preferred_element_type=compute,
            _dot_general=einsum_dot_general or jax.lax.dot_general,
        ).reshape(logits_shape)
    logits = logits * jnp.asarray(scale, compute)
    if bias is not None:
        logits = logits + bias.astype(compute)

    where = _combine_masks(mask, is_causal, window, lookahead, lengths, logits_shape)
    if sink is not None:
        sink = sink[..., None]
    weights = masked_softmax(logits, where=where, sink=sink)
    lse = None
    if want_lse:
        lse = _dense_logsumexp(logits, where, None if sink is None else sink[..., None])

    if module is not None:
        # The string names the same collection in Linen and NNX (nnx.Intermediate). As in
        # Flax, force_fp32_for_softmax sows the weights as the softmax made them (float32;
        # here they always are).
        sown = jnp.float32 if force_fp32_for_softmax else dtype
        module.sow("intermediates", "attention_weights", weights.astype(sown))
    if dropout_on:
        keep_prob = 1.0 - jax.lax.stop_gradient(dropout_rate)
        # Flax's pattern: with broadcast_dropout, one (q_len, kv_len) draw for all batch
        # entries and heads; the same key therefore drops the same weights as Flax.
        shape = (1,) * (len(batch) + 1) + (q_len, kv_len) if broadcast_dropout else None
        assert dropout_rng is not None  # checked above whenever dropout is on
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape or logits_shape)
        weights = weights * (keep.astype(compute) / jnp.asarray(keep_prob, compute))

    if attn_weights_value_einsum is not None:
        out = attn_weights_value_einsum("...hqk,...khd->...qhd", weights.astype(dtype), value)
        out = out.astype(dtype)
    else:
        grouped_weights = weights.astype(dtype).reshape(*batch, kv_heads, groups, q_len, kv_len)
        out = jnp.einsum(
            "...hgqk,...khd->...qhgd",
            grouped_weights,
            value,
            precision=precision,
            preferred_element_type=compute,
            _dot_general=einsum_dot_general or jax.lax.dot_general,
        )
        out = out.reshape(*batch, q_len, heads, value.shape[-1]).astype(dtype)
    if lse is None:
        return out
    return _with_logsumexp(out, lse, return_residual, key.dtype)


# Below this many logits per (batch, head) the dense path is as fast and its memory small.
CHUNKED_MIN_LOGITS = 1024 * 1024
# Query and key block sizes of the chunked path, measured on CPU (benchmarks/attention.py).
DEFAULT_CHUNK = (256, 512)


def _use_chunked(implementation, q_len, kv_len, custom_einsum, module):
    if implementation not in (None, "dense", "chunked"):
        raise ValueError(
            f"`implementation` must be None, 'dense' or 'chunked', got {implementation!r}."
        )
    if implementation == "dense" or q_len == 0 or kv_len == 0:
        return False
    if custom_einsum or module is not None:
        if implementation == "chunked":
            raise ValueError(
                "The chunked path never forms the attention weights, so it takes neither "
                "custom einsums nor a `module` to sow them into (sow_weights=True); use "
                "implementation='dense' or None."
            )
        return False
    if forward_mode_enabled():
        if implementation == "chunked":
            raise ValueError(
                "The chunked path has a reverse-mode rule only; inside "
                "stablelayers.forward_mode() use implementation='dense' or None."
            )
        return False
    return implementation == "chunked" or q_len * kv_len >= CHUNKED_MIN_LOGITS


def _either(ours, our_name, theirs, their_name):
    if theirs is None:
        return ours
    if ours is not None:
        raise ValueError(f"`{our_name}` and jax.nn's `{their_name}` are the same; give one.")
    return theirs


def _local_window(size):
    """jax.nn's ``local_window_size`` as ``(window, lookahead)``: key ``k`` is visible from
    query ``q`` when ``q - left <= k <= q + right``, that is ``q - k < left + 1`` (the
    look-back ``window``) and ``k - q <= right``; an int is ``(size, size)``."""
    left, right = (size, size) if not isinstance(size, (tuple, list)) else size
    left = _checks.positive_int(operator.index(left) + 1, "local_window_size") - 1
    right = _checks.positive_int(operator.index(right) + 1, "local_window_size") - 1
    return left + 1, right


def _implementation(implementation):
    if implementation == "xla":
        # jax.nn's XLA implementation: both of stablelayers' paths are XLA code.
        return None
    if implementation == "cudnn":
        raise ValueError(
            "implementation='cudnn' calls cuDNN's fused attention, which stablelayers does "
            "not use (its fully masked rows would be the mean of the values, not 0); use "
            "implementation=None, 'dense' or 'chunked', or call "
            "jax.nn.dot_product_attention for cuDNN."
        )
    return implementation


def _with_logsumexp(out, lse, as_residual, key_dtype):
    """``(out, lse)``, or with ``as_residual`` jax.nn's residual: the logsumexp in the
    key's dtype, shape ``(batch..., q_len, heads)``, gradient stopped."""
    if not as_residual:
        return out, lse
    return out, jax.lax.stop_gradient(jnp.swapaxes(lse, -1, -2).astype(key_dtype))


def _block_sizes(chunk_size):
    """``(query block, key block)`` from ``chunk_size``: an int for both, or a pair."""
    if chunk_size is None:
        return DEFAULT_CHUNK
    if isinstance(chunk_size, (tuple, list)):
        if len(chunk_size) != 2:
            raise ValueError(
                "`chunk_size` must be an int or a pair (query block, key block), got "
                f"{chunk_size!r}."
            )
        return tuple(_checks.positive_int(n, "chunk_size") for n in chunk_size)
    size = _checks.positive_int(chunk_size, "chunk_size")
    return size, size


def _silence_dead_rows(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    q_lengths: jax.Array | None,
    kv_lengths: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero the queries, keys and values that no pair of the attention uses.

    A key that every query masks (padding past ``key_lengths``, or a mask column that is
    False throughout) has weight 0 in every row, but 0 times the NaN or inf that padding
    may hold is NaN: in the weighted sum, and in the gradient of the query through the
    logits. Likewise a query that attends nothing, in the gradient of the keys. Zeroed,
    they contribute exactly nothing, and their own gradients are exactly 0.
    """
    if mask is None and q_lengths is None and kv_lengths is None:
        return query, key, value
    *batch, q_len, _, _ = query.shape
    kv_len = key.shape[-3]
    q_live = _live_positions(mask, q_lengths, batch, q_len, reduce=(-3, -1))
    k_live = _live_positions(mask, kv_lengths, batch, kv_len, reduce=(-3, -2))
    if q_live is not None:
        query = jnp.where(q_live[..., None, None], query, 0)
    if k_live is not None:
        key = jnp.where(k_live[..., None, None], key, 0)
        value = jnp.where(k_live[..., None, None], value, 0)
    return query, key, value


def _live_positions(
    mask: jax.Array | None,
    lengths: jax.Array | None,
    batch: list[int],
    n: int,
    reduce: tuple[int, int],
) -> jax.Array | None:
    """Per batch entry, which of ``n`` positions some pair may use: below ``lengths`` and
    not masked along the mask's heads and other positions; shape ``(batch..., n)``."""
    live = None
    if mask is not None:
        full = mask.reshape((1,) * (len(batch) + 3 - mask.ndim) + mask.shape)
        any_live = jnp.any(full, axis=reduce)
        live = jnp.broadcast_to(any_live, (*batch, n))
    if lengths is not None:
        below = jnp.arange(n, dtype=jnp.int32) < lengths[..., None]
        live = below if live is None else live & below
    return live


def _check_lengths(lengths, name, batch):
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be an integer array, got dtype {lengths.dtype}.")
    _check_broadcast(name, lengths.shape, batch, "(batch...)")
    return jnp.broadcast_to(lengths, batch).astype(jnp.int32)


def _dense_logsumexp(logits, where, sink):
    """log(exp(sink) + sum of exp over the unmasked logits) per row; -inf for an empty row."""
    # Masked logits are left out with a finite stand-in (no inf inside, for
    # jax.debug_infs) and a zero weight; an empty row (no keys at all) has total 0.
    live = (
        jnp.ones(logits.shape, bool) if where is None else jnp.broadcast_to(where, logits.shape)
    )
    lowest = jnp.finfo(logits.dtype).min
    top = jnp.max(jnp.where(live, logits, lowest), axis=-1, keepdims=True, initial=lowest)
    if sink is not None:
        top = jnp.maximum(top, sink)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    shifted = jnp.where(live, logits - top, lowest)
    total = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    if sink is not None:
        total = total + jnp.exp(sink - top)
    safe = jnp.where(total == 0, 1.0, total)
    return jnp.where(total == 0, -jnp.inf, top + jnp.log(safe))[..., 0]


def _chunked(
    query,
    key,
    value,
    bias,
    mask,
    sink,
    q_lengths,
    kv_lengths,
    *,
    scale,
    is_causal,
    window,
    lookahead,
    precision,
    chunk_size,
    dropout,
):
    *batch, q_len, heads, qk_dim = query.shape
    kv_len, kv_heads, v_dim = value.shape[-3:]
    groups = heads // kv_heads
    n_batch = math.prod(batch)
    dtype = query.dtype
    compute = _float_arithmetic.compute_dtype(dtype)
    block_q, block_k = _block_sizes(chunk_size)
    block_q, block_k = min(block_q, q_len), min(block_k, kv_len)
    q_pad, kv_pad = -q_len % block_q, -kv_len % block_k

    q = query.reshape(n_batch, q_len, kv_heads, groups, qk_dim).transpose(0, 2, 3, 1, 4)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, q_pad), (0, 0)))
    k, v = (
        jnp.pad(
            x.reshape(n_batch, kv_len, kv_heads, -1).transpose(0, 2, 1, 3),
            ((0, 0), (0, 0), (0, kv_pad), (0, 0)),
        )
        for x in (key, value)
    )
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
        if lengths is None
        else jnp.clip(lengths.reshape(n_batch), 0, n)
        for lengths, n in ((q_lengths, q_len), (kv_lengths, kv_len))
    )
    rng = rate = None
    if dropout is not None:
        rng, rate, broadcast = dropout
        rate = jnp.asarray(jax.lax.stop_gradient(rate), compute)
    cfg = _chunked_attention.Config(
        block_q=block_q,
        block_k=block_k,
        scale=float(scale),
        is_causal=bool(is_causal),
        window=window,
        lookahead=lookahead,
        dtype=dtype,
        precision=precision,
        broadcast_dropout=dropout is not None and bool(broadcast),
        dropout=dropout is not None,
    )
    out, lse = _chunked_attention.chunked_attention(
        cfg, q, k, v, bias, mask, sink, q_lengths, kv_lengths, rng, rate
    )
    out = out[:, :, :, :q_len].transpose(0, 3, 1, 2, 4).reshape(*batch, q_len, heads, v_dim)
    lse = lse[:, :, :, :q_len].reshape(*batch, heads, q_len)
    return out.astype(dtype), lse


def _canonical(x, batch, kv_heads, groups, q_len, kv_len, q_pad, kv_pad):
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


def _combine_masks(mask, is_causal, window, lookahead, lengths, logits_shape):
    where = mask
    q_len, kv_len = logits_shape[-2:]
    q_pos = jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0)
    k_pos = jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1)

    def both(a, b):
        return b if a is None else a & b

    if is_causal:
        where = both(where, k_pos <= q_pos)
    if window is not None:
        where = both(where, q_pos - k_pos < window)
    if lookahead is not None:
        where = both(where, k_pos - q_pos <= lookahead)
    q_lengths, kv_lengths = lengths
    if q_lengths is not None:
        where = both(where, q_pos < q_lengths[..., None, None, None])
    if kv_lengths is not None:
        where = both(where, k_pos < kv_lengths[..., None, None, None])
    return where
