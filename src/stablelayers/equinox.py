"""Equinox layers for the stablelayers ops.

Each layer keeps its parameters as array fields and calls the functional core, so it gives
the same numbers as :func:`stablelayers.softmax` and friends. Only Equinox is imported
here; this module works without Flax.

:class:`MultiHeadAttention` is a drop-in for :class:`equinox.nn.MultiheadAttention` (same
constructor, call and fields) that computes attention with
:func:`stablelayers.dot_product_attention` and can have learnable sinks.
"""

# This file is ``stablelayers/equinox.py``: ``import equinox`` below is an absolute import
# and finds the real Equinox, not this module.
from __future__ import annotations

import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from stablelayers import _checks, _layers
from stablelayers._attention import dot_product_attention
from stablelayers._linear_cross_entropy import linear_softmax_cross_entropy
from stablelayers._log_softmax import log_softmax
from stablelayers._softmax import softmax
from stablelayers._softplus import softplus

__all__ = ["LMHead", "LogSoftmax", "MaskedSoftmax", "MultiHeadAttention", "Softmax", "Softplus"]

_ProcessHeads = Callable[[Array, Array, Array], tuple[Array, Array, Array]]


def _default_dtype(dtype):
    # As equinox.nn: float64 when JAX runs in 64-bit mode, else float32.
    return jnp.result_type(float) if dtype is None else dtype


class Softmax(eqx.Module):
    """Softmax over `axis`, as [`stablelayers.softmax`][]."""

    axis: int | tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, axis: int | tuple[int, ...] | None = -1):
        """**Arguments:**

        - `axis`: The axis, or tuple of axes, that forms a row; `None` for all axes.
        """
        self.axis = _checks.check_axis(axis)

    def __call__(
        self, x: Array, where: Array | None = None, *, key: PRNGKeyArray | None = None
    ) -> Array:
        """**Arguments:**

        - `x`: Logits, a JAX array of any shape.
        - `where`: Optional boolean mask broadcastable to `x.shape`. `False` entries get
            exactly 0, and a row with nothing unmasked is all 0.
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        A JAX array of the shape and dtype of `x`.
        """
        del key
        return softmax(x, axis=self.axis, where=where)


class LogSoftmax(eqx.Module):
    """Log-softmax over `axis`, as [`stablelayers.log_softmax`][]."""

    axis: int | tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, axis: int | tuple[int, ...] | None = -1):
        """**Arguments:**

        - `axis`: The axis, or tuple of axes, that forms a row; `None` for all axes.
        """
        self.axis = _checks.check_axis(axis)

    def __call__(
        self, x: Array, where: Array | None = None, *, key: PRNGKeyArray | None = None
    ) -> Array:
        """**Arguments:**

        - `x`: Logits, a JAX array of any shape.
        - `where`: Optional boolean mask broadcastable to `x.shape`. `False` entries are
            `-inf` with gradient 0.
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        A JAX array of the shape and dtype of `x`.
        """
        del key
        return log_softmax(x, axis=self.axis, where=where)


class Softplus(eqx.Module):
    """`log(1 + exp(beta * x)) / beta`, as [`stablelayers.softplus`][], with an optionally
    learnable `beta`.

    A learnable beta is stored as the scalar field `log_beta` and used as
    `beta = exp(log_beta)`, so it stays positive under any update.
    """

    log_beta: Array | None
    beta: float | None = eqx.field(static=True)

    def __init__(self, beta: float = 1.0, learnable: bool = False, dtype=None):
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
            jnp.asarray(_layers.log_beta_init(beta), _default_dtype(dtype))
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

    def __init__(self, num_heads: int | None = None, sink: bool = False, dtype=None):
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
        self.sink = jnp.zeros(shape, _default_dtype(dtype)) if sink else None

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


class MultiHeadAttention(eqx.Module):
    r"""A drop-in for [`equinox.nn.MultiheadAttention`][] that computes attention with
    [`stablelayers.dot_product_attention`][], optionally with learnable sinks.

    Constructor, call and fields are those of `equinox.nn.MultiheadAttention`, and the
    same `key` gives the same weights. Two things differ:

    - a query whose keys are all masked (a padded position) gives exactly 0 after the
      attention (so exactly the output bias, 0 by default) and passes no gradient, where
      `equinox.nn.MultiheadAttention` returns the mean of the values;
    - `sink=True` adds one learnable logit per head to the softmax normaliser (gpt-oss
      style): the field `sink` of shape `(num_heads,)`, starting at 0.

    Otherwise the outputs agree to float rounding.
    """

    query_proj: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value_proj: eqx.nn.Linear
    output_proj: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    sink: Array | None

    num_heads: int = eqx.field(static=True)
    query_size: int = eqx.field(static=True)
    key_size: int = eqx.field(static=True)
    value_size: int = eqx.field(static=True)
    output_size: int = eqx.field(static=True)
    qk_size: int = eqx.field(static=True)
    vo_size: int = eqx.field(static=True)
    use_query_bias: bool = eqx.field(static=True)
    use_key_bias: bool = eqx.field(static=True)
    use_value_bias: bool = eqx.field(static=True)
    use_output_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        num_heads: int,
        query_size: int,
        key_size: int | None = None,
        value_size: int | None = None,
        output_size: int | None = None,
        qk_size: int | None = None,
        vo_size: int | None = None,
        use_query_bias: bool = False,
        use_key_bias: bool = False,
        use_value_bias: bool = False,
        use_output_bias: bool = False,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype=None,
        *,
        sink: bool = False,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `num_heads`: Number of parallel attention heads $h$.
        - `query_size`: Number of input channels for query $Q$.
        - `key_size`: Number of input channels for key $K$. Defaults to `query_size`.
        - `value_size`: Number of input channels for value $V$. Defaults to `query_size`.
        - `output_size`: Number of output channels. Defaults to `query_size`.
        - `qk_size`: Number of channels to compare query and key over, per head. Defaults
            to `query_size // num_heads`.
        - `vo_size`: Number of channels to compare attention-weighted value and output
            over, per head. Defaults to `query_size // num_heads`.
        - `use_query_bias`: Whether to use a bias term in the query projections.
        - `use_key_bias`: Whether to use a bias term in the key projections.
        - `use_value_bias`: Whether to use a bias term in the value projections.
        - `use_output_bias`: Whether to use a bias term in the output projection.
        - `dropout_p`: Dropout probability on attention weights.
        - `inference`: Whether to actually apply dropout at all. If `True` then dropout is
            not applied. This may be toggled with [`equinox.nn.inference_mode`][] or
            overridden during `__call__`.
        - `dtype`: The dtype to use for all trainable parameters in this layer, the sink
            included. Defaults to either `jax.numpy.float32` or `jax.numpy.float64`
            depending on whether JAX is in 64-bit mode.
        - `sink`: Whether to add a learnable sink logit per head (the field `sink`, shape
            `(num_heads,)`, initialised to 0). (Keyword only argument.)
        - `key`: A `jax.random.PRNGKey` used to provide randomness for parameter
            initialisation. (Keyword only argument.)
        """
        checked_heads = _layers.check_num_heads(num_heads)
        if checked_heads is None:
            raise TypeError("`num_heads` must be an int, got None.")
        num_heads = checked_heads
        dtype = _default_dtype(dtype)
        key_size = query_size if key_size is None else key_size
        value_size = query_size if value_size is None else value_size
        output_size = query_size if output_size is None else output_size
        qk_size = query_size // num_heads if qk_size is None else qk_size
        vo_size = query_size // num_heads if vo_size is None else vo_size
        if qk_size < 1 or vo_size < 1:
            raise ValueError(
                f"qk_size={qk_size} and vo_size={vo_size} must be at least 1; with the "
                f"defaults, query_size ({query_size}) must be at least num_heads "
                f"({num_heads})."
            )
        # The same split and the same Linear calls in the same order as
        # equinox.nn.MultiheadAttention, so one key gives the same weights.
        qkey, kkey, vkey, okey = jax.random.split(key, 4)
        linear = eqx.nn.Linear
        self.query_proj = linear(
            query_size, num_heads * qk_size, use_bias=use_query_bias, dtype=dtype, key=qkey
        )
        self.key_proj = linear(
            key_size, num_heads * qk_size, use_bias=use_key_bias, dtype=dtype, key=kkey
        )
        self.value_proj = linear(
            value_size, num_heads * vo_size, use_bias=use_value_bias, dtype=dtype, key=vkey
        )
        self.output_proj = linear(
            num_heads * vo_size, output_size, use_bias=use_output_bias, dtype=dtype, key=okey
        )
        self.dropout = eqx.nn.Dropout(dropout_p, inference=inference)
        self.sink = jnp.zeros((num_heads,), dtype) if sink else None

        self.num_heads = num_heads
        self.query_size = query_size
        self.key_size = key_size
        self.value_size = value_size
        self.output_size = output_size
        self.qk_size = qk_size
        self.vo_size = vo_size
        self.use_query_bias = use_query_bias
        self.use_key_bias = use_key_bias
        self.use_value_bias = use_value_bias
        self.use_output_bias = use_output_bias

    def __call__(
        self,
        query: Array,
        key_: Array,
        value: Array,
        mask: Array | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        deterministic: bool | None = None,
        process_heads: _ProcessHeads | None = None,
    ) -> Array:
        """**Arguments:**

        - `query`: Query embedding. Should be a JAX array of shape
            `(query_seq_length, query_size)`.
        - `key_`: Key embedding. Should be a JAX array of shape
            `(kv_seq_length, key_size)`.
        - `value`: Value embedding. Should be a JAX array of shape
            `(kv_seq_length, value_size)`.
        - `mask`: Optional mask preventing attention to certain positions. Should either
            be a JAX array of shape `(query_seq_length, kv_seq_length)`, or (for custom
            per-head masking) `(num_heads, query_seq_length, kv_seq_length)`. A value of
            `False` at a position indicates that position should be ignored; a query
            position with every key masked gets exactly 0 before the output projection.
        - `key`: A `jax.random.PRNGKey` used for dropout. Unused if `dropout_p = 0`.
            (Keyword only argument.)
        - `inference`: As [`equinox.nn.Dropout.__call__`][]. (Keyword only argument.)
        - `deterministic`: (Deprecated in favour of `inference`.)
        - `process_heads`: A function that takes in the query, key, and value heads, of
            shapes `(seq_length, num_heads, qk_size)` (twice) and
            `(seq_length, num_heads, vo_size)`, and returns new ones of the same shapes;
            e.g. rotary positional embeddings. (Keyword only argument.)

        **Returns:**

        A JAX array of shape `(query_seq_length, output_size)`.
        """
        if deterministic is not None:
            inference = deterministic
            warnings.warn(
                "MultiHeadAttention()(deterministic=...) is deprecated in favour of "
                "MultiHeadAttention()(inference=...)",
                stacklevel=2,
            )
        for name, array, size in (
            ("query", query, self.query_size),
            ("key_", key_, self.key_size),
            ("value", value, self.value_size),
        ):
            if jnp.ndim(array) != 2 or jnp.shape(array)[1] != size:
                raise ValueError(
                    f"`{name}` must have shape (seq_length, {size}), got "
                    f"{jnp.shape(array)}; use jax.vmap for batch dimensions."
                )
        if key_.shape[0] != value.shape[0]:
            raise ValueError("key and value must both be sequences of equal length.")
        q_len, kv_len = query.shape[0], key_.shape[0]
        if mask is not None and jnp.shape(mask) not in (
            (q_len, kv_len),
            (self.num_heads, q_len, kv_len),
        ):
            raise ValueError(
                f"`mask` must have shape (query_seq_length, kv_seq_length)=({q_len}, "
                f"{kv_len}) or (num_heads, query_seq_length, kv_seq_length)="
                f"({self.num_heads}, {q_len}, {kv_len}); got {jnp.shape(mask)}."
            )

        if inference is None:
            inference = self.dropout.inference
        rate = self.dropout.p
        # As equinox.nn.Dropout: only a Python 0 switches dropout off statically.
        no_dropout = inference or (isinstance(rate, (int, float)) and rate == 0)
        if not no_dropout and key is None:
            raise RuntimeError(
                "Dropout requires a key when running in non-deterministic mode; pass "
                "`key=...` or `inference=True`."
            )
        query_heads = self._project(self.query_proj, query)
        key_heads = self._project(self.key_proj, key_)
        value_heads = self._project(self.value_proj, value)
        if process_heads is not None:
            shapes = (query_heads.shape, key_heads.shape, value_heads.shape)
            query_heads, key_heads, value_heads = process_heads(
                query_heads, key_heads, value_heads
            )
            if (query_heads.shape, key_heads.shape, value_heads.shape) != shapes:
                raise ValueError("process_heads must not change the shape of the heads.")

        attn = dot_product_attention(
            query_heads,
            key_heads,
            value_heads,
            mask=mask,
            sink=self.sink,
            dropout_rng=key,
            dropout_rate=rate,
            # Equinox drops each head's weights independently.
            broadcast_dropout=False,
            deterministic=bool(no_dropout),
        )
        return jax.vmap(self.output_proj)(attn.reshape(q_len, -1))

    def _project(self, proj: eqx.nn.Linear, x: Array) -> Array:
        return jax.vmap(proj)(x).reshape(x.shape[0], self.num_heads, -1)


class LMHead(eqx.Module):
    """An output projection that returns the per-token cross-entropy, as
    [`stablelayers.linear_softmax_cross_entropy`][]: the `(tokens, vocab)` logits are never
    formed during training."""

    weight: Array
    bias: Array | None
    chunk_size: int | None = eqx.field(static=True)
    label_smoothing: float = eqx.field(static=True)
    z_loss: float = eqx.field(static=True)
    ignore_index: int | None = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        *,
        use_bias: bool = True,
        chunk_size: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        ignore_index: int | None = None,
        dtype: jnp.dtype | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`: Width of the hidden states.
        - `vocab_size`: Number of classes.
        - `use_bias`: Add a `(vocab,)` bias (initialised to zero).
        - `chunk_size`, `label_smoothing`, `z_loss`, `ignore_index`: As in the function.
        - `dtype`: Parameter dtype (float64 under x64, else float32, as `equinox.nn`).
        - `key`: PRNG key for the weight, `(in_features, vocab_size)` (`hidden @ weight`),
            uniform in `+-1/sqrt(in_features)` as `eqx.nn.Linear`.
        """
        dtype = _default_dtype(dtype)
        limit = 1 / in_features**0.5
        shape = (in_features, vocab_size)
        self.weight = jax.random.uniform(key, shape, dtype, -limit, limit)
        self.bias = jnp.zeros((vocab_size,), dtype) if use_bias else None
        self.chunk_size, self.label_smoothing, self.z_loss = chunk_size, label_smoothing, z_loss
        self.ignore_index = ignore_index

    def __call__(
        self, hidden: Array, labels: Array, *, key: PRNGKeyArray | None = None
    ) -> Array:
        """**Arguments:**

        - `hidden`: Hidden states of shape `(..., in_features)`.
        - `labels`: Integer targets of shape `(...)`.
        - `key`: Ignored.

        **Returns:**

        The per-token loss, of `labels`' shape; reduce it with e.g.
        [`stablelayers.mean_over_valid`][].
        """
        del key
        return linear_softmax_cross_entropy(
            hidden,
            self.weight,
            labels,
            bias=self.bias,
            chunk_size=self.chunk_size,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            ignore_index=self.ignore_index,
        )

    def logits(self, hidden: Array) -> Array:
        """The full logits `hidden @ weight + bias`, for evaluation and sampling."""
        out = hidden @ self.weight
        return out if self.bias is None else out + jnp.broadcast_to(self.bias, out.shape)
