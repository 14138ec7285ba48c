"""The examples' models in Equinox, built from ``stablelayers.equinox`` layers.

As usual in Equinox, each model takes one example; :func:`functional` maps it over the
batch.
"""

from __future__ import annotations

import equinox as eqx
import jax

import stablelayers.equinox as sl
from _lm import LMConfig, attention_mask, textbook_attention
from _train import Model


def functional(module: eqx.Module) -> Model:
    """The module's floating-point arrays plus a pure, batched function of them."""
    params, static = eqx.partition(module, eqx.is_inexact_array)
    return Model(params, lambda p, *inputs: jax.vmap(eqx.combine(p, static))(*inputs))


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

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = jax.vmap(self.attention_norm)(x)
        if self.textbook:
            x = x + _textbook_multihead(self.attention, h, mask)
        else:
            x = x + self.attention(h, h, h, mask)
        h = jax.vmap(self.mlp_norm)(x)
        return x + jax.vmap(lambda v: self.mlp_out(jax.nn.gelu(self.mlp_in(v))))(h)


def _textbook_multihead(layer: sl.MultiHeadAttention, x: jax.Array, mask: jax.Array):
    # The layer's own projections around the textbook softmax; its sinks go unused.
    def heads(proj: eqx.nn.Linear) -> jax.Array:
        return jax.vmap(proj)(x).reshape(x.shape[0], layer.num_heads, -1)

    out = textbook_attention(
        heads(layer.query_proj), heads(layer.key_proj), heads(layer.value_proj), mask=mask
    )
    return jax.vmap(layer.output_proj)(out.reshape(x.shape[0], -1))


class LM(eqx.Module):
    """Character-level causal transformer: tokens ``(L,)`` to log-probabilities of the next
    character ``(L, vocab)``."""

    embed: jax.Array
    position: jax.Array
    blocks: list[Block]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    log_softmax: sl.LogSoftmax

    def __init__(self, config: LMConfig, *, key: jax.Array):
        k_embed, k_position, k_head, *k_blocks = jax.random.split(key, 3 + config.depth)
        self.embed = 0.02 * jax.random.normal(k_embed, (config.vocab_size, config.width))
        self.position = 0.02 * jax.random.normal(k_position, (config.seq_len, config.width))
        self.blocks = [Block(config, key=k) for k in k_blocks]
        self.norm = eqx.nn.LayerNorm(config.width)
        self.head = eqx.nn.Linear(config.width, config.vocab_size, key=k_head)
        self.log_softmax = sl.LogSoftmax()

    def __call__(self, tokens: jax.Array) -> jax.Array:
        mask = attention_mask(tokens)[0]  # (L, L): Equinox's layer takes no head axis
        x = self.embed[tokens] + self.position[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.log_softmax(jax.vmap(self.head)(jax.vmap(self.norm)(x)))


def mlp(sizes: tuple[int, ...], seed: int) -> Model:
    return functional(MLP(sizes, key=jax.random.key(seed)))


def lm(config: LMConfig, seed: int) -> Model:
    return functional(LM(config, key=jax.random.key(seed)))
