r"""linear_softmax_cross_entropy: the loss of ``softmax(hidden @ weight + bias)`` without
ever forming the ``(tokens, vocab)`` logits, forward or backward.

After Wijmans et al. (ICLR 2025, "Cut Your Losses in Large-Vocabulary Language Models"),
in pure JAX. With ``reduction='none'`` (the loss per token) the vocabulary is walked in
blocks of ``chunk_size`` columns:

* forward: each block's logits ``l = h W_c + b_c`` feed an online log-sum-exp
  (``m' = max(m, max l)``, ``s' = s e^{m - m'} + sum e^{l - m'}``; Milakov & Gimelshein,
  2018) and pick out the target logit; only ``lse`` per token is kept.
* backward: each block's logits are recomputed, ``G = g ((1 + 2 z lse) e^{l - lse} - q)``
  formed for the block alone, and ``dh += G W_c^T``, ``dW_c = h^T G``, ``db_c = sum G``.

So the largest temporaries are ``(tokens, chunk_size)``, and the price is one more
``tokens x hidden x vocab`` product than the materialised loss (four instead of three).
With ``reduction='mean'`` or ``'sum'`` the cotangent is one number and the gradient is
formed in the forward pass instead: three products. A logit soft-cap ``c`` maps each
block's logits to ``c tanh(l / c)`` inside the loop (Gemma 2, arXiv:2408.00118), and
the backward pass multiplies ``G`` by ``1 - tanh^2(l / c)`` before its products.

This module holds the public function and its checks; the parts are
:mod:`~stablelayers.losses._fused_per_token` (``'none'``),
:mod:`~stablelayers.losses._fused_summed` (``'mean'``, ``'sum'``) and
:mod:`~stablelayers.losses._fused_terms` (their records, block walker and arithmetic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stablelayers._core import arithmetic, checks
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.losses._cross_entropy import (
    Reduction,
    check_integer_labels,
    check_loss_options,
    check_reduction,
    check_soft_cap,
    is_off,
    out_of_range,
    poison,
)
from stablelayers.losses._fused_per_token import Static as PerTokenStatic
from stablelayers.losses._fused_per_token import per_token_op
from stablelayers.losses._fused_summed import Static as SummedStatic
from stablelayers.losses._fused_summed import summed_op
from stablelayers.losses._fused_terms import Flags, Inputs
from stablelayers.losses._vocab_shards import Shard, any_class, label_masked, shard

__all__ = ["Reduction", "linear_softmax_cross_entropy"]

# Chosen on docs/loss_benchmarks.md: at 8192 tokens x 32768 vocabulary the fused loss's XLA
# temporaries are under 1/16 of optax's on materialised logits, with either reduction and
# in float32 and half precision. reduction='none': vocabulary columns per block (the
# block's float32 logits and gradient dominate; half precision also keeps a half-precision
# copy of the gradient). 'mean'/'sum': logits elements per chunk of tokens (a chunk's
# float32 logits and gradient, next to the float32 dW every chunk adds to, which half
# precision keeps besides its output); larger chunks make fewer, larger products.
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_CHUNK_SIZE_HALF = 512
DEFAULT_CHUNK_ELEMENTS = 2**23
DEFAULT_CHUNK_ELEMENTS_HALF = 2**22
# With the vocabulary split over n devices (axis_name): the per-token default over n.
MIN_SHARD_BLOCK = 128


def _chunk(
    chunk_size: int | None, dtype: jnp.dtype, shape: tuple[int, int], whole: bool
) -> int:
    """The block size along the walked axis: vocabulary columns per block, or with
    ``whole`` rows (tokens) per chunk; ``shape`` is ``(tokens, vocab)``."""
    tokens, vocab = shape
    half = dtype.itemsize < 4
    if chunk_size is not None:
        size = checks.positive_int(chunk_size, "chunk_size")
    elif whole:
        elements = DEFAULT_CHUNK_ELEMENTS_HALF if half else DEFAULT_CHUNK_ELEMENTS
        size = max(1, elements // vocab)
    else:
        size = DEFAULT_CHUNK_SIZE_HALF if half else DEFAULT_CHUNK_SIZE
    return max(1, min(size, tokens if whole else vocab))


def _check_arrays(
    hidden: ArrayLike, weight: ArrayLike, bias: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    h = checks.as_float_array(hidden, "hidden")
    w = checks.as_float_array(weight, "weight")
    if h.ndim < 1 or w.ndim != 2 or w.shape[0] != h.shape[-1]:
        raise ValueError(
            f"`weight` must have shape (hidden, vocab) = ({h.shape[-1] if h.ndim else '?'}, "
            f"vocab) for `hidden` of shape {h.shape}, got {w.shape}; pass `weight.T` if "
            "it is stored (vocab, hidden), as a tied embedding is."
        )
    if bias is None:
        return h, w, None
    b = checks.as_float_array(bias, "bias")
    if b.shape != (w.shape[1],):
        raise ValueError(f"`bias` must have shape ({w.shape[1]},), got {b.shape}.")
    return h, w, b


@allow_rank_promotion
def linear_softmax_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    vocab_mask: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    reduction: Reduction = "none",
    logits_soft_cap: ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Cross-entropy of ``softmax(hidden @ weight + bias)``, never forming the
    ``(tokens, vocab)`` logits (Wijmans et al., ICLR 2025, "Cut Your Losses in
    Large-Vocabulary Language Models").

    Equal, to float32 rounding, to
    ``softmax_cross_entropy(hidden @ weight + bias, labels, ...)`` (then reduced): the same
    loss, options and gradient, ``dlogits = (1 + 2 z lse) softmax - q``, applied a block at
    a time. Peak memory is ``O(tokens x chunk_size)`` (``'none'``) or
    ``O(chunk_size x vocab + hidden x vocab)`` (``'mean'``, ``'sum'``) instead of
    ``O(tokens x vocab)``. A reduced loss costs the three ``tokens x hidden x vocab``
    products of the materialised loss (its gradient is formed in the forward pass, and the
    backward pass scales it); the per-token loss costs four (the backward pass recomputes
    the logits), so reduce here when the loss is a mean or a sum.

    Args:
        hidden: ``(..., hidden)`` features, e.g. ``(batch, length, d_model)``.
        weight: ``(hidden, vocab)`` output projection, the layout of ``hidden @ weight``
            (Flax's ``Dense`` kernel; transpose a tied ``(vocab, hidden)`` embedding).
        labels: integer targets of ``hidden``'s shape without its last axis.
        bias: optional ``(vocab,)`` bias.
        vocab_mask: optional boolean ``(vocab,)`` mask of the classes: ``False`` tokens of
            the vocabulary are left out of the softmax and of the smoothing (a label on one
            counts as no target mass, as a class masked by :func:`softmax_cross_entropy`'s
            ``where``). Not called ``where``: it masks classes, the same for every token,
            not entries of the (never formed) logits.
        label_smoothing: ``eps`` in ``[0, 1)``, spread over the unmasked vocabulary;
            checked when concrete, taken as it is when traced (under ``jit``, or from a
            schedule), and the loss is differentiable in it.
        z_loss: coefficient ``>= 0`` of PaLM's ``lse^2`` term; as ``label_smoothing``.
        ignore_index: labels equal to it give loss 0 and gradient 0, whatever their hidden
            state holds (NaN and inf included).
        chunk_size: the block size along the walked axis, which need not divide it. With
            ``'none'``: vocabulary columns per block (default 1024, 512 for
            half-precision inputs). With ``'mean'``/``'sum'``: tokens per chunk (default
            ``2**23 // vocab``, ``2**22 // vocab`` for half precision, at least 1).
            With ``axis_name`` (any reduction): columns per block on each device,
            default the per-token default over the axis's devices, at least 128.
        reduction: ``'none'`` (the loss per token), ``'mean'`` (over the tokens not
            ignored; 0, with gradient 0, when every token is) or ``'sum'``.
        logits_soft_cap: ``c > 0``, or ``None`` (the default: no op is added). The loss
            is that of ``c tanh(z / c)`` for ``z = hidden @ weight + bias`` (Gemma 2's
            final-logit soft-capping, arXiv:2408.00118, section 2, ``c = 30``;
            Liger-Kernel's ``softcap``), capped a block at a time inside the loss (the
            logits are still never formed); ``vocab_mask``, the smoothing, the z-loss,
            ``ignore_index`` and the reduction apply to the capped logits, and the
            backward pass multiplies ``dloss/dlogits`` by ``1 - tanh^2(z / c)`` before its
            products. Equal to :func:`softmax_cross_entropy`'s ``logits_soft_cap`` on the
            materialised logits. Checked when concrete (a positive finite number); a
            traced one is taken as it is, and the loss is differentiable in it (both
            modes, any order), ``d(c tanh u)/dc = tanh u - u (1 - tanh^2 u)``.
        axis_name: inside ``jax.shard_map``, the mesh axis that splits the vocabulary
            (``None``: one device holds it all). ``weight`` is then this device's
            ``(hidden, V / n)`` columns (device ``d`` of ``n`` holding columns
            ``[d V / n, (d + 1) V / n)``, ``shard_map``'s plain split of ``P(None, axis)``),
            ``bias`` and ``vocab_mask`` its ``(V / n,)`` entries, while ``hidden`` and the
            global ``labels`` in ``[0, V)`` are the same on every device of the axis.
            Each device walks its own columns; per token the shards' max, sum of
            exponentials, label logit and sum of logits combine by ``pmax``/``psum``
            (Megatron-LM's vocab-parallel cross-entropy): no weight column or logit
            crosses devices, ``dW`` and ``db`` stay on their shard and ``dh`` is summed
            once. The result is the whole vocabulary's loss on every device of the axis.
            A ``'mean'``/``'sum'`` reduces the tokens this call sees (the per-token
            walk, four products: on each device it was as fast as the summed loss's
            three, with smaller temporaries); tokens split over another (data) axis
            too are reduced over it by :func:`linear_softmax_cross_entropy_sharded`, or
            by a ``psum``.

    Returns:
        The loss per token, of ``labels``' shape (``'none'``), or a scalar, in the dtype
        of the logits it forms: float32 (float64 under x64 for float64 inputs), also for
        half-precision inputs, whose products accumulate in float32 and are never rounded
        to half precision (:func:`softmax_cross_entropy` likewise returns its logits'
        dtype; cast the result to round it). A label outside ``[0, vocab)`` that is
        not ``ignore_index`` gives NaN, with NaN gradient, for its token (and so for a
        ``'mean'`` or ``'sum'``), never a number; under
        ``jax.experimental.checkify.checkify`` it raises.

    Raises:
        TypeError: non-integer labels, non-boolean ``vocab_mask``, non-float inputs.
        ValueError: shapes that do not fit together, options out of range, an unknown
            ``reduction``, an ``axis_name`` not bound by ``shard_map``.
    """
    check_reduction(reduction)
    h, w, b = _check_arrays(hidden, weight, bias)
    vocab = w.shape[1]
    where: Shard | None = None
    if axis_name is not None:
        where = shard(axis_name, vocab, "linear_softmax_cross_entropy")
    eps, z = check_loss_options(label_smoothing, z_loss, ignore_index)
    cap = check_soft_cap(logits_soft_cap)
    labels_ = check_integer_labels(labels, h.shape[:-1]).reshape(-1)
    dtype = jnp.result_type(h.dtype, w.dtype)
    mask = checks.check_where(vocab_mask, (vocab,), "vocab_mask")
    missed = None
    if mask is not None:
        mask = jnp.broadcast_to(mask, (vocab,))
        # A label on a masked class has no target mass (softmax_cross_entropy's `where`
        # rule); an out-of-range label reads True here and is poisoned below.
        missed = label_masked(mask, labels_, where)
    mask = jnp.ones((vocab,), bool) if mask is None else mask
    rows = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1]).astype(dtype)
    counted = jnp.ones_like(labels_, bool)
    if ignore_index is not None:
        counted = labels_ != ignore_index
    # An ignored token's features are replaced before any product reads them; with the
    # whole vocabulary masked no token has a loss.
    h = jnp.where(counted[:, None], h, 0.0)
    counted = counted & any_class(mask, where)
    bad = out_of_range(
        labels_,
        vocab if where is None else where.vocab,
        counted,
        "linear_softmax_cross_entropy",
    )
    out_dtype = arithmetic.compute_dtype(dtype)
    flags = Flags(
        smoothing=not is_off(eps),
        z_loss=not is_off(z),
        soft_cap_grad=cap is not None and not isinstance(cap, float),
    )
    inputs = Inputs(
        hidden=h,
        weight=w.astype(dtype),
        bias=b,
        # Under a shard, the label's column among this device's (or none of them).
        labels=labels_ if where is None else labels_ - where.offset,
        vocab_mask=mask,
        counted=counted,
        missed=missed,
        label_smoothing=jnp.asarray(eps, out_dtype),
        z_loss=jnp.asarray(z, out_dtype),
        logits_soft_cap=None if cap is None else jnp.asarray(cap, out_dtype),
    )
    walk_tokens = reduction != "none" and where is None
    size = _chunk(chunk_size, dtype, (h.shape[0], vocab), walk_tokens)
    if where is not None:
        if chunk_size is None:
            # The (tokens, block) temporaries shrink with the devices as the weight does
            # (down to MIN_SHARD_BLOCK columns, under which the products get inefficient).
            size = min(size, max(MIN_SHARD_BLOCK, size // where.devices))
        # 'mean'/'sum' too: the per-token walk, reduced here. The summed op's chunks of
        # tokens would each need the shards' lse, and on each device its chunk holds
        # all of the device's columns: measured (docs/scaling.md) larger temporaries and
        # no faster than the per-token walk's blocks.
        loss = poison(per_token_op(inputs, PerTokenStatic(size, flags, axis_name)), bad)
        if reduction == "none":
            return loss.astype(out_dtype).reshape(rows)
        # Poisoned whole, as one device's summed op is (NaN in every gradient entry).
        total = poison(jnp.sum(loss), jnp.any(bad))
        if reduction == "mean":
            total = total / jnp.maximum(jnp.sum(counted), 1).astype(total.dtype)
        return total.astype(out_dtype)
    if reduction == "none":
        loss = poison(per_token_op(inputs, PerTokenStatic(size, flags, axis_name)), bad)
        return loss.astype(out_dtype).reshape(rows)
    if h.shape[0] == 0:
        return jnp.zeros((), out_dtype)
    bias_dtype = None if b is None else b.dtype
    total = summed_op(inputs, SummedStatic(size, flags, dtype, bias_dtype))
    total = poison(total, jnp.any(bad))
    if reduction == "mean":
        total = total / jnp.maximum(jnp.sum(counted), 1).astype(total.dtype)
    return total.astype(out_dtype)
