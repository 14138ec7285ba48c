"""Equinox layers for the stablelayers ops.

Each layer keeps its parameters as array fields and calls the functional core, so it gives
the same numbers as :func:`stablelayers.softmax` and friends. Only Equinox is imported
here; this module works without Flax.

:class:`MultiheadAttention` (Equinox's spelling; ``MultiHeadAttention`` is the same class)
is a drop-in for :class:`equinox.nn.MultiheadAttention` (same
constructor, call and fields) that computes attention with
:func:`stablelayers.dot_product_attention` and can have learnable sinks.
"""

# This file is ``stablelayers/equinox.py``: ``import equinox`` below is an absolute import
# and finds the real Equinox, not this module.
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import DTypeLike
from jaxtyping import Array, PRNGKeyArray

from stablelayers import _layers
from stablelayers._core import checks
from stablelayers._equinox_attention import MultiHeadAttention, MultiheadAttention
from stablelayers.losses import _vocab_parallel
from stablelayers.ops._log_softmax import log_softmax
from stablelayers.ops._softmax import softmax
from stablelayers.ops._softplus import softplus

__all__ = [
    "LMHead",
    "LogSoftmax",
    "MaskedSoftmax",
    "MultiHeadAttention",
    "MultiheadAttention",
    "Softmax",
    "Softplus",
]


class _Rowwise(eqx.Module):
    """A softmax-family function over `axis` as a layer: `layer(x, where=None)` is
    `function(x, axis=layer.axis, where=where)`."""

    axis: int | tuple[int, ...] | None = eqx.field(static=True)
    _function: ClassVar[Callable[..., Array]]

    def __init__(self, axis: int | tuple[int, ...] | None = -1):
        """**Arguments:**

        - `axis`: The axis, or tuple of axes, that forms a row; `None` for all axes.
        """
        self.axis = checks.check_axis(axis)

    def __call__(
        self, x: Array, where: Array | None = None, *, key: PRNGKeyArray | None = None
    ) -> Array:
        """**Arguments:**

        - `x`: Logits, a JAX array of any shape.
        - `where`: Optional boolean mask broadcastable to `x.shape`.
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        A JAX array of the shape and dtype of `x`.
        """
        del key
        return type(self)._function(x, axis=self.axis, where=where)


class Softmax(_Rowwise):
    """Softmax over `axis`, as [`stablelayers.softmax`][]: `layer(x, where=None)`.

    `where` (optional, boolean, broadcastable to `x.shape`) leaves entries out: they get
    exactly 0, and a row with nothing unmasked is all 0.
    """

    _function = staticmethod(softmax)


class LogSoftmax(_Rowwise):
    """Log-softmax over `axis`, as [`stablelayers.log_softmax`][]: `layer(x, where=None)`.

    `where` (optional, boolean, broadcastable to `x.shape`) leaves entries out: they are
    `-inf` with gradient 0.
    """

    _function = staticmethod(log_softmax)


class Softplus(eqx.Module):
    """`log(1 + exp(beta * x)) / beta`, as [`stablelayers.softplus`][], with an optionally
    learnable `beta`.

    A learnable beta is stored as the scalar field `log_beta` and used as
    `beta = exp(log_beta)`, so it stays positive under any update.
    """

    log_beta: Array | None
    beta: float | None = eqx.field(static=True)

    def __init__(
        self, beta: float = 1.0, learnable: bool = False, dtype: DTypeLike | None = None
    ):
        """**Arguments:**

        - `beta`: The initial (or, if not learnable, fixed) positive temperature.
        - `learnable`: Whether beta is a trainable parameter (the field `log_beta`,
            initialised to `log(beta)`). If `False`, `beta` is a constant.
        - `dtype`: The dtype of `log_beta`. Defaults to either `jax.numpy.float32` or
            `jax.numpy.float64` depending on whether JAX is in 64-bit mode.
        """
        beta = _layers.softplus_beta(beta)
        self.beta = None if learnable else beta
        self.log_beta = (
            jnp.asarray(_layers.log_beta_init(beta), _layers.default_param_dtype(dtype))
            if learnable
            else None
        )

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        """**Arguments:**

        - `x`: A JAX array of any shape.
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        A JAX array of the shape and dtype of `x`.
        """
        del key
        if self.log_beta is None:
            assert self.beta is not None  # set whenever log_beta is not
            return softplus(x, self.beta)
        return _layers.learnable_softplus(x, self.log_beta)


class MaskedSoftmax(eqx.Module):
    """The attention softmax, as [`stablelayers.masked_softmax`][], with optional
    learnable sinks (gpt-oss style).

    Normalises attention logits of shape `(..., num_heads, q_seq, kv_seq)` over the last
    (key) axis. `-inf` logits and `False` mask entries are left out, and a query row with
    nothing left is exactly 0 with zero gradient.
    """

    sink: Array | None
    num_heads: int | None = eqx.field(static=True)

    def __init__(
        self, num_heads: int | None = None, sink: bool = False, dtype: DTypeLike | None = None
    ):
        """**Arguments:**

        - `num_heads`: The number of heads, the size of the logits' axis `-3`; checked on
            every call when given. With `sink=True` there is one sink per head; with
            `None`, one sink shared by all heads.
        - `sink`: Whether to add a learnable sink logit to each row's normaliser. The field
            `sink` has shape `(num_heads,)` (or `()`) and starts at 0 ("softmax1").
        - `dtype`: The dtype of the sink. Defaults to either `jax.numpy.float32` or
            `jax.numpy.float64` depending on whether JAX is in 64-bit mode.
        """
        self.num_heads = _layers.check_num_heads(num_heads)
        shape = _layers.sink_shape(self.num_heads)
        self.sink = jnp.zeros(shape, _layers.default_param_dtype(dtype)) if sink else None

    def __call__(
        self,
        logits: Array,
        where: Array | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Array:
        """**Arguments:**

        - `logits`: A JAX array of shape `(..., num_heads, q_seq, kv_seq)` (any shape if
            there is neither `num_heads` nor a sink).
        - `where`: Optional boolean mask broadcastable to `logits.shape`.
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        A JAX array of the shape and dtype of `logits`; each row sums to 1 minus the
        sink's share, or to 0 if nothing in it is unmasked.
        """
        del key
        return _layers.heads_masked_softmax(logits, where, self.sink, self.num_heads)


class LMHead(eqx.Module):
    """An output projection that returns the cross-entropy, as
    [`stablelayers.linear_softmax_cross_entropy`][]: the `(tokens, vocab)` logits are never
    formed during training."""

    weight: Array
    bias: Array | None
    options: _layers.LossOptions = eqx.field(static=True)
    parallel: Any = eqx.field(static=True, default=None)

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        *,
        use_bias: bool = True,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
        vocab_axis: str | None = None,
        token_axis: str | None = None,
        mesh: Mesh | None = None,
        **options: Any,
    ):
        """**Arguments:**

        - `in_features`: Width of the hidden states.
        - `vocab_size`: Number of classes.
        - `use_bias`: Add a `(vocab,)` bias (initialised to zero).
        - `dtype`: Parameter dtype (float64 under x64, else float32, as `equinox.nn`).
        - `key`: PRNG key for the weight, `(in_features, vocab_size)` (`hidden @ weight`),
            uniform in `+-1/sqrt(in_features)` as `eqx.nn.Linear`.
        - `**options`: The function's keywords (`reduction`, `label_smoothing`, `z_loss`,
            `ignore_index`, `chunk_size`, `logits_soft_cap`, e.g. `30.0` for Gemma 2's
            final-logit soft-capping), checked here; kept as the static field
            `options`. A training loss that is a mean is cheaper as `reduction='mean'`
            (three products, not four).
        - `vocab_axis`: The mesh axis the vocabulary is split over (tensor parallelism),
            or `None`. The loss is then [`stablelayers.linear_softmax_cross_entropy_sharded`][]
            (each device walks its own columns; no weight or logit is gathered). Equinox
            has no partitioning metadata: place `weight` as `P(None, vocab_axis)` and
            `bias` as `P(vocab_axis)` yourself (`eqx.filter_shard` or
            `jax.device_put` with a `NamedSharding`), or leave it to `jit`.
        - `token_axis`: The mesh axis the tokens (the first axis of `hidden`) are split
            over, with `vocab_axis`; `None`: replicated.
        - `mesh`: The `jax.sharding.Mesh`, with `vocab_axis`; `None`: the one
            `jax.set_mesh` has set.
        """
        self.options = _layers.loss_options(options)
        self.parallel = _vocab_parallel.lm_head_parallel(vocab_axis, token_axis, mesh)
        param_dtype = _layers.default_param_dtype(dtype)
        limit = 1 / in_features**0.5
        shape = (in_features, vocab_size)
        self.weight = jax.random.uniform(key, shape, param_dtype, -limit, limit)
        self.bias = jnp.zeros((vocab_size,), param_dtype) if use_bias else None

    def __call__(
        self, hidden: Array, labels: Array, *, key: PRNGKeyArray | None = None
    ) -> Array:
        """**Arguments:**

        - `hidden`: Hidden states of shape `(..., in_features)`.
        - `labels`: Integer targets of shape `(...)`.
        - `key`: Ignored.

        **Returns:**

        The per-token loss, of `labels`' shape (`reduction='none'`; reduce it with e.g.
        [`stablelayers.mean_over_valid`][]), or a scalar.
        """
        del key
        return _vocab_parallel.lm_head_loss(
            hidden, self.weight, labels, self.bias, dict(self.options), self.parallel
        )

    def logits(self, hidden: Array) -> Array:
        """The full logits `hidden @ weight + bias`, for evaluation and sampling."""
        out = hidden @ self.weight
        return out if self.bias is None else out + jnp.broadcast_to(self.bias, out.shape)
