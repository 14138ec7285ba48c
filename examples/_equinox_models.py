"""The examples' models in Equinox, built from ``stablelayers.equinox`` layers.

As usual in Equinox, the MLP takes one example and :func:`functional` maps it over the
batch. The language model takes the whole batch and maps each layer itself
(:func:`_per_token`), for speed on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import equinox as eqx
import jax

import stablelayers.equinox as sl
from _data import PAD
from _lm import LMConfig, attention_mask, segment_positions, textbook_attention
from _train import Model


def functional(module: eqx.Module, batched: bool = False) -> Model:
    """The module's floating-point arrays plus a pure, batched function of them; a module
    that is not ``batched`` (takes one example) is mapped over the batch."""
    params, static = eqx.partition(module, eqx.is_inexact_array)

    def apply(p, *inputs):
        model = eqx.combine(p, static)
        return model(*inputs) if batched else jax.vmap(model)(*inputs)

    return Model(params, apply)


def _per_token(layer: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``layer`` applied to every vector along the last axis of ``x``."""
    # One vmap over the flattened tokens: a vmap (batch) of a vmap (positions) of
    # eqx.nn.Linear runs about twice as slowly on XLA's CPU backend (jax 0.10.2).
    flat = jax.vmap(layer)(x.reshape(-1, x.shape[-1]))
    return flat.reshape(*x.shape[:-1], flat.shape[-1])


class MLP(eqx.Module):
    """Linear layers with learnable-temperature ``Softplus`` between them; the output is
    a log-probability per class (``LogSoftmax``)."""

    linears: list[eqx.nn.Linear]
    activations: list[sl.Softplus]
    log_softmax: sl.LogSoftmax

    def __init__(self, sizes: tuple[int, ...], *, key: jax.Array):
        keys = jax.random.split(key, len(sizes) - 1)
        pairs = zip(sizes[:-1], sizes[1:], keys, strict=True)
        self.linears = [eqx.nn.Linear(a, b, key=k) for a, b, k in pairs]
        self.activations = [sl.Softplus(beta=1.0, learnable=True) for _ in sizes[1:-1]]
        self.log_softmax = sl.LogSoftmax()

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, activation in zip(self.linears, self.activations, strict=False):
            x = activation(linear(x))
        return self.log_softmax(self.linears[-1](x))


class Block(eqx.Module):
    """A pre-norm transformer block; attention with one learnable sink per head."""

    attention_norm: eqx.nn.LayerNorm
    attention: sl.MultiHeadAttention
    mlp_norm: eqx.nn.LayerNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    textbook: bool = eqx.field(static=True)

    def __init__(self, config: LMConfig, *, key: jax.Array):
        k_attention, k_in, k_out = jax.random.split(key, 3)
        width = config.width
        self.attention_norm = eqx.nn.LayerNorm(width)
        self.attention = sl.MultiHeadAttention(
            config.heads, width, use_query_bias=True, use_key_bias=True,
            use_value_bias=True, use_output_bias=True, sink=config.sinks, key=k_attention,
        )  # fmt: skip
        self.mlp_norm = eqx.nn.LayerNorm(width)
        self.mlp_in = eqx.nn.Linear(width, 4 * width, key=k_in)
        self.mlp_out = eqx.nn.Linear(4 * width, width, key=k_out)
        self.textbook = config.textbook

    def __call__(
        self, x: jax.Array, mask: jax.Array | None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """``x``: ``(batch, L, width)``; ``mask``: ``(batch, L, L)``, or ``None`` with
        ``segment_ids`` ``(batch, L)`` (packed rows)."""
        h = _per_token(self.attention_norm, x)
        # The attention layer takes one sequence.
        if segment_ids is not None:
            attend = functools.partial(_packed_self_attention, self.attention)
            x = x + jax.vmap(attend)(h, segment_ids)
        else:
            attend = _textbook_multihead if self.textbook else _self_attention
            x = x + jax.vmap(functools.partial(attend, self.attention))(h, mask)
        h = _per_token(self.mlp_norm, x)
        return x + _per_token(lambda v: self.mlp_out(jax.nn.gelu(self.mlp_in(v))), h)


def _self_attention(layer: sl.MultiHeadAttention, x: jax.Array, mask: jax.Array):
    return layer(x, x, x, mask)


def _packed_self_attention(layer: sl.MultiHeadAttention, x: jax.Array, segment_ids: jax.Array):
    """Causal attention within each segment of one packed row, ``segment_ids``
    ``(L,)``: no mask is formed."""
    return layer(x, x, x, segment_ids=segment_ids, is_causal=True)


def _textbook_multihead(layer: sl.MultiHeadAttention, x: jax.Array, mask: jax.Array):
    # The layer's own projections around the textbook softmax; its sinks go unused.
    def heads(proj: eqx.nn.Linear) -> jax.Array:
        return jax.vmap(proj)(x).reshape(x.shape[0], layer.num_heads, -1)

    out = textbook_attention(
        heads(layer.query_proj), heads(layer.key_proj), heads(layer.value_proj), mask=mask
    )
    return jax.vmap(layer.output_proj)(out.reshape(x.shape[0], -1))


class LM(eqx.Module):
    """Character-level causal transformer: tokens ``(batch, L)`` to log-probabilities of
    the next character ``(batch, L, vocab)``, or with ``targets`` ``(batch, L)`` to the
    mean loss over the targets that are not padding, from the fused head
    (``stablelayers.equinox.LMHead``: the logits are never formed).

    With ``segment_ids`` ``(batch, L)`` (packed rows) a token attends the earlier tokens
    of its own segment only, positions count from each segment's start, and no mask is
    formed."""

    embed: jax.Array
    position: jax.Array
    blocks: list[Block]
    norm: eqx.nn.LayerNorm
    head: sl.LMHead
    log_softmax: sl.LogSoftmax

    def __init__(self, config: LMConfig, *, key: jax.Array):
        k_embed, k_position, k_head, *k_blocks = jax.random.split(key, 3 + config.depth)
        self.embed = 0.02 * jax.random.normal(k_embed, (config.vocab_size, config.width))
        self.position = 0.02 * jax.random.normal(k_position, (config.seq_len, config.width))
        self.blocks = [Block(config, key=k) for k in k_blocks]
        self.norm = eqx.nn.LayerNorm(config.width)
        self.head = sl.LMHead(
            config.width, config.vocab_size, ignore_index=PAD, reduction="mean", key=k_head
        )
        self.log_softmax = sl.LogSoftmax()

    def __call__(
        self,
        tokens: jax.Array,
        targets: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        if segment_ids is None:
            mask = attention_mask(tokens)[:, 0]  # (batch, L, L): Equinox's has no head axis
            x = self.embed[tokens] + self.position[None, : tokens.shape[-1]]
        else:  # packed rows: causal within each segment, no mask
            mask = None
            x = self.embed[tokens] + self.position[segment_positions(segment_ids)]
        for block in self.blocks:
            x = block(x, mask, segment_ids)
        x = _per_token(self.norm, x)
        if targets is not None:
            return self.head(x, targets)
        return self.log_softmax(self.head.logits(x))


def mlp(sizes: tuple[int, ...], seed: int) -> Model:
    return functional(MLP(sizes, key=jax.random.key(seed)))


def lm(config: LMConfig, seed: int) -> Model:
    return functional(LM(config, key=jax.random.key(seed)), batched=True)
