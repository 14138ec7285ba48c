"""The examples' models in Flax NNX, built from ``stablelayers.nnx`` layers."""

from __future__ import annotations

from itertools import pairwise

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import stablelayers
import stablelayers.nnx as sl
from _data import PAD
from _lm import LMConfig, attention_mask, segment_positions, textbook_attention
from _train import Model


def functional(module: nnx.Module) -> Model:
    """The module as trainable state plus a pure function of it (NNX's functional API)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return Model(params, lambda p, *inputs: nnx.merge(graphdef, p, rest)(*inputs))


class MLP(nnx.Module):
    """Linear layers with learnable-temperature ``Softplus`` between them; the output is
    a log-probability per class (``LogSoftmax``)."""

    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        self.linears = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairwise(sizes)])
        self.activations = nnx.List(
            [sl.Softplus(beta=1.0, learnable=True) for _ in sizes[1:-1]]
        )
        self.log_softmax = sl.LogSoftmax()

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, activation in zip(self.linears, self.activations, strict=False):
            x = activation(linear(x))
        return self.log_softmax(self.linears[-1](x))


class LongContextAttention(sl.DotProductAttention):
    """Causal attention on stablelayers' chunked path, for ``--context``: memory linear in
    the context, and no ``L x L`` mask is ever built.

    Rows are right-padded, so under the causal mask no real token sees a padded one, and
    padded positions carry no loss: the causal mask alone gives the same loss and
    gradients as the full causal-and-padding mask, so the model passes no mask. With
    ``--packing`` the segment ids that the layer hands over reach
    :func:`stablelayers.dot_product_attention` here, which forms no mask from them either.
    """

    def __call__(self, query, key, value, bias=None, mask=None, **kwargs):
        kwargs.update(is_causal=True, implementation="chunked")
        return super().__call__(query, key, value, bias, mask, **kwargs)


class RingAttention(sl.DotProductAttention):
    """Causal ring attention for ``--context-parallel N``: the sequence is split over a
    mesh axis ``"seq"`` of ``N`` devices (``stablelayers.ring_attention_sharded``, zigzag
    layout), keys and values travel round the ring, and with ``--packing`` their segment
    ids with them (the layer's ``segment_ids=`` reach ``ring_attention_sharded``). As in
    ``LongContextAttention``, the causal mask alone gives the masked
    model's loss and gradients on right-padded rows, so the model passes no mask."""

    def __init__(self, num_heads: int, sink: bool, devices: int):
        super().__init__(num_heads, sink=sink)
        self.devices = devices

    def __call__(self, query, key, value, bias=None, mask=None, **kwargs):
        if bias is not None or mask is not None:
            raise ValueError("RingAttention takes no bias and no mask.")
        # Dropout and dtype keywords are not used by the model.
        mesh = Mesh(np.array(jax.local_devices()[: self.devices]), ("seq",))
        sink = None if self.sink is None else self.sink[...]
        return stablelayers.ring_attention_sharded(
            query, key, value, mesh=mesh, axis_name="seq", sink=sink, is_causal=True
        )


class Block(nnx.Module):
    """A pre-norm transformer block; attention with one learnable sink per head."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        width = config.width
        self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
        if config.textbook:
            self.attention = nnx.MultiHeadAttention(
                config.heads, width, attention_fn=textbook_attention, decode=False, rngs=rngs
            )
        elif config.context_parallel > 1:
            self.attention = sl.MultiHeadAttention(
                config.heads,
                width,
                attention_fn=RingAttention(config.heads, config.sinks, config.context_parallel),
                decode=False,
                rngs=rngs,
            )
        elif config.long_context:
            # The same parameters (attention_fn.sink included) as the default branch.
            self.attention = sl.MultiHeadAttention(
                config.heads,
                width,
                attention_fn=LongContextAttention(config.heads, sink=config.sinks),
                decode=False,
                rngs=rngs,
            )
        else:
            self.attention = sl.MultiHeadAttention(
                config.heads, width, sink=config.sinks, decode=False, rngs=rngs
            )
        self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        h = self.attention_norm(x)
        if segment_ids is None:
            x = x + self.attention(h, mask=mask)
        else:
            # Packed rows: causal within each segment, and no mask at all.
            x = x + self.attention(h, is_causal=True, segment_ids=segment_ids)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class LM(nnx.Module):
    """Character-level causal transformer: tokens ``(batch, L)`` to log-probabilities of
    the next character ``(batch, L, vocab)``, or with ``targets`` ``(batch, L)`` to the
    mean loss over the targets that are not padding, from the fused head
    (``stablelayers.nnx.LMHead``: the logits are never formed).

    With ``segment_ids`` ``(batch, L)`` (packed rows, ``--packing``) a token attends
    the earlier tokens of its own segment only, positions count from each segment's
    start, and no mask is formed."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(config.vocab_size, config.width, embedding_init=init, rngs=rngs)
        self.position = nnx.Param(init(rngs.params(), (config.seq_len, config.width)))
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
        self.norm = nnx.LayerNorm(config.width, rngs=rngs)
        parallel = {}
        if config.tensor_parallel > 1:
            # --tensor-parallel: each device walks its own columns of the vocabulary.
            devices = np.array(jax.devices()[: config.tensor_parallel])
            parallel = dict(vocab_axis="tp", mesh=Mesh(devices, ("tp",)))
        self.head = sl.LMHead(
            config.width,
            config.vocab_size,
            ignore_index=PAD,
            reduction="mean",
            rngs=rngs,
            **parallel,
        )
        self.log_softmax = sl.LogSoftmax()
        self.causal = config.long_context or config.context_parallel > 1

    def __call__(
        self,
        tokens: jax.Array,
        targets: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        # --context, --context-parallel and packed rows: the attention is causal by
        # itself, and an L x L mask would be the one quadratic array left.
        mask = None if self.causal or segment_ids is not None else attention_mask(tokens)
        if segment_ids is None:
            position = self.position[None, : tokens.shape[-1]]
        else:
            position = self.position[segment_positions(segment_ids)]
        x = self.embed(tokens) + position
        for block in self.blocks:
            x = block(x, mask, segment_ids)
        x = self.norm(x)
        if targets is not None:
            return self.head(x, targets)
        return self.log_softmax(self.head.logits(x))


def mlp(sizes: tuple[int, ...], seed: int) -> Model:
    return functional(MLP(sizes, rngs=nnx.Rngs(seed)))


def lm(config: LMConfig, seed: int) -> Model:
    return functional(LM(config, rngs=nnx.Rngs(seed)))
