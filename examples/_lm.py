"""What the NNX and Equinox language models share: the attention mask, the positions
within packed documents, the textbook attention that ``--compare-naive`` swaps in, and the
model's size."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from _data import PAD


@dataclass(frozen=True)
class LMConfig:
    """The shape of the character-level transformer."""

    vocab_size: int
    seq_len: int
    width: int
    depth: int
    heads: int
    # One learnable attention sink per head (stablelayers' attention only).
    sinks: bool = True
    # `textbook_attention` instead of stablelayers' (no sinks), for --compare-naive.
    textbook: bool = False
    # --context: causal attention on the chunked path, without an L x L mask.
    long_context: bool = False
    # --context-parallel N: causal ring attention with the sequence split over N devices.
    context_parallel: int = 1
    # --tensor-parallel N: the head's vocabulary split over N devices (mesh axis "tp").
    tensor_parallel: int = 1


def attention_mask(tokens: jax.Array) -> jax.Array:
    """Causal and padding mask, shape ``(..., 1, L, L)`` for tokens of shape ``(..., L)``.

    Padding is masked as both query and key (as ``flax.nnx.make_attention_mask`` does), so
    the query row of every padded position has no key left: exactly the rows the textbook
    softmax turns into NaN and ``stablelayers`` into zeros.
    """
    valid = tokens != PAD
    length = tokens.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    pairs = valid[..., :, None] & valid[..., None, :]
    return (jnp.broadcast_to(causal, pairs.shape) & pairs)[..., None, :, :]


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """The position of each token within its segment, ``(..., L)`` int32: 0 where a
    segment starts in the row, counting up to its end.

    A packed document that starts mid-row gets the same position embeddings as a padded
    row that starts with it, so the positions say how much context a token has.
    """
    index = jnp.broadcast_to(
        jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape
    )
    starts = jnp.concatenate(
        [
            jnp.ones_like(segment_ids[..., :1], dtype=bool),
            segment_ids[..., 1:] != segment_ids[..., :-1],
        ],
        axis=-1,
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


def textbook_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    **unused: object,
) -> jax.Array:
    """``softmax(where(mask, q.k / sqrt(d), -inf)) @ v`` with ``jax.nn.softmax``, as in
    textbooks: a query row whose keys are all masked becomes ``exp(-inf - -inf) = NaN``.

    The layout and signature of :func:`stablelayers.dot_product_attention` (Flax's
    ``attention_fn``); the keywords Flax passes for dropout and dtype are ignored.
    """
    del unused
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(query.shape[-1])
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)
