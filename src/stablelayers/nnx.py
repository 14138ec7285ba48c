"""Flax NNX layers for the stablelayers ops.

Each layer holds its parameters as :class:`flax.nnx.Param` and calls the functional core,
so it gives the same numbers as :func:`stablelayers.softmax` and friends. Only Flax is
imported here; ``stablelayers.equinox`` works without Flax and this module without Equinox.

For attention without sinks no new class is needed: pass
``attention_fn=stablelayers.dot_product_attention`` to :class:`flax.nnx.MultiHeadAttention`.
:class:`MultiHeadAttention` here does that by default and adds learnable sinks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.typing import ArrayLike, DTypeLike

from stablelayers import _layers
from stablelayers._core import checks
from stablelayers.attention._api import dot_product_attention
from stablelayers.losses import _vocab_parallel
from stablelayers.ops._log_softmax import log_softmax
from stablelayers.ops._softmax import softmax
from stablelayers.ops._softplus import softplus

__all__ = [
    "DotProductAttention",
    "LMHead",
    "LogSoftmax",
    "MaskedSoftmax",
    "MultiHeadAttention",
    "Softmax",
    "Softplus",
]


class _Rowwise(nnx.Module):
    """A softmax-family function over ``axis`` as a layer: ``layer(x, where=None)`` is
    ``function(x, axis=layer.axis, where=where)``."""

    _function: ClassVar[Callable[..., jax.Array]]

    def __init__(self, axis: _layers.Axis = -1):
        self.axis = checks.check_axis(axis)

    def __call__(self, x: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
        """The layer's function of ``x`` (any shape) over ``self.axis``, masked by
        ``where``; an array of ``x``'s shape and dtype."""
        return type(self)._function(x, axis=self.axis, where=where)


class Softmax(_Rowwise):
    """Softmax over ``axis``, as :func:`stablelayers.softmax`: ``layer(x, where=None)``.

    Args:
        axis: the axis, or tuple of axes, that forms a row; ``None`` for all axes.

    ``where`` (optional, boolean, broadcastable to ``x.shape``) leaves entries out: they get
    exactly 0, and a row with nothing unmasked is all 0.

    Example::

        >>> layer = Softmax()
        >>> y = layer(jnp.array([[1.0, 2.0, 3.0]]))  # rows sum to one
    """

    _function = staticmethod(softmax)


class LogSoftmax(_Rowwise):
    """Log-softmax over ``axis``, as :func:`stablelayers.log_softmax`:
    ``layer(x, where=None)``.

    Args:
        axis: the axis, or tuple of axes, that forms a row; ``None`` for all axes.

    ``where`` (optional, boolean, broadcastable to ``x.shape``) leaves entries out: they are
    ``-inf`` with gradient 0.
    """

    _function = staticmethod(log_softmax)


class Softplus(nnx.Module):
    r"""``log(1 + exp(beta * x)) / beta``, as :func:`stablelayers.softplus`.

    Args:
        beta: the initial (or, if not learnable, fixed) positive temperature, a number.
        learnable: make beta a trainable parameter. It is stored as
            ``log_beta = nnx.Param(log(beta))``, a scalar, and the layer uses
            ``beta = exp(log_beta)``, so beta stays positive under any update.
        param_dtype: dtype of ``log_beta``.

    Attributes:
        beta: the fixed temperature (a Python float), or ``None`` when learnable.
        log_beta: the ``nnx.Param`` holding ``log(beta)``, or ``None`` when not learnable.
    """

    def __init__(
        self,
        beta: float = 1.0,
        learnable: bool = False,
        *,
        param_dtype: DTypeLike = jnp.float32,
    ):
        beta = _layers.softplus_beta(beta)
        self.beta: float | None = None if learnable else beta
        self.log_beta: nnx.Param[jax.Array] | None = (
            nnx.Param(jnp.asarray(_layers.log_beta_init(beta), param_dtype))
            if learnable
            else None
        )

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Softplus of ``x`` with the layer's beta.

        Args:
            x: input of any shape.

        Returns:
            An array of ``x``'s shape and dtype.
        """
        if self.log_beta is None:
            assert self.beta is not None  # set whenever log_beta is not
            return softplus(x, self.beta)
        return _layers.learnable_softplus(x, self.log_beta[...])


class _SinkOwner(nnx.Module):
    """A layer that may own learnable sinks: ``self.sink``, one logit per head (or one
    shared), an ``nnx.Param`` starting at 0, or ``None``."""

    def __init__(
        self,
        num_heads: int | None = None,
        sink: bool = False,
        *,
        param_dtype: DTypeLike = jnp.float32,
    ):
        self.num_heads = _layers.check_num_heads(num_heads)
        self.sink: nnx.Param[jax.Array] | None = (
            nnx.Param(jnp.zeros(_layers.sink_shape(self.num_heads), param_dtype))
            if sink
            else None
        )

    def _sink_value(self) -> jax.Array | None:
        return None if self.sink is None else self.sink[...]


class MaskedSoftmax(_SinkOwner):
    """The attention softmax, as :func:`stablelayers.masked_softmax`, with optional
    learnable sinks.

    Called as ``layer(logits, where=None)``, with the function's semantics: a query row
    with nothing left is exactly 0, with zero gradient.

    Args:
        num_heads: the number of heads, the size of the logits' axis ``-3``; checked on
            every call when given. With ``sink=True`` there is one sink per head; with
            ``None``, one sink shared by all heads.
        sink: add a learnable sink logit, ``self.sink = nnx.Param(zeros(num_heads))``
            (gpt-oss style), to each row's normaliser. It starts at 0, which is
            "softmax1"; assign ``layer.sink[...] = value`` to start elsewhere.
        param_dtype: dtype of the sink.
    """

    def __call__(self, logits: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
        """``masked_softmax(logits, where=where, sink=...)`` with the layer's sinks, over the
        key axis of ``(batch..., heads, q_len, kv_len)`` logits."""
        sink = self._sink_value()
        return _layers.heads_masked_softmax(logits, where, sink, self.num_heads)


class DotProductAttention(_SinkOwner):
    """:func:`stablelayers.dot_product_attention` as a module that owns learnable sinks.

    Use it as the ``attention_fn`` of :class:`flax.nnx.MultiHeadAttention` to give that
    class sinks (this is what :class:`MultiHeadAttention` does)::

        attn = nnx.MultiHeadAttention(
            8, 64, attention_fn=DotProductAttention(8, sink=True), rngs=nnx.Rngs(0)
        )

    Args:
        num_heads: the number of query heads; checked on every call when given. With
            ``sink=True`` there is one sink per head; with ``None``, one shared sink.
        sink: hold a learnable sink logit per head, ``self.sink = nnx.Param(zeros(...))``.
        param_dtype: dtype of the sink.
    """

    def __call__(self, query: ArrayLike, *args: Any, **kwargs: Any) -> jax.Array:
        """:func:`stablelayers.dot_product_attention` with the layer's sinks: the function's
        arguments but ``sink``, in its order (``query, key, value, bias, mask, ...``)."""
        sink = self._sink_value()
        # The query is checked here and the arguments go straight to the function, so a
        # mask passes through no other module on its way to the softmax.
        _layers.check_heads(query, self.num_heads)
        return cast(jax.Array, dot_product_attention(query, *args, sink=sink, **kwargs))


class MultiHeadAttention(nnx.MultiHeadAttention):
    """:class:`flax.nnx.MultiHeadAttention` on :func:`stablelayers.dot_product_attention`,
    with optional learnable sinks.

    It takes every argument of :class:`flax.nnx.MultiHeadAttention`, is called the same
    way, and has the same parameters, so its state loads into Flax's class and back. The
    differences: ``attention_fn`` defaults to :func:`stablelayers.dot_product_attention`
    (a query whose keys are all masked gives exactly 0 and no gradient, rather than the
    mean of the values), and ``sink=True`` adds one learnable sink logit per head.

    Args:
        num_heads: number of (query) heads.
        in_features: number of input features.
        qkv_features: see :class:`flax.nnx.MultiHeadAttention`.
        out_features: see :class:`flax.nnx.MultiHeadAttention`.
        num_kv_heads: see :class:`flax.nnx.MultiHeadAttention` (grouped-query attention).
        in_kv_features: see :class:`flax.nnx.MultiHeadAttention`.
        sink: add a learnable sink per head. The parameter is
            ``self.attention_fn.sink``, shape ``(num_heads,)``, initialised to 0; it
            needs the default ``attention_fn``.
        attention_fn: the attention function, by default
            :func:`stablelayers.dot_product_attention`.
        param_dtype: dtype of all parameters, the sink included.
        rngs: the :class:`flax.nnx.Rngs` for initialisation (and dropout).
        **kwargs: the other keyword arguments of :class:`flax.nnx.MultiHeadAttention`
            (``dtype``, ``dropout_rate``, ``decode``, ``kernel_init``, ...).

    Raises:
        ValueError: ``sink=True`` together with a custom ``attention_fn``.
    """

    # Flax's positional arguments go through as they come (in_features, qkv_features,
    # out_features, num_kv_heads, in_kv_features), none re-listed here.
    def __init__(
        self,
        num_heads: int,
        *args: Any,
        sink: bool = False,
        attention_fn: Callable[..., jax.Array] = dot_product_attention,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        if sink:
            if attention_fn is not dot_product_attention:
                raise ValueError(
                    "sink=True puts the sinks in a DotProductAttention module that replaces "
                    "`attention_fn`; leave `attention_fn` at its default, or pass "
                    "attention_fn=DotProductAttention(num_heads, sink=True) yourself."
                )
            attention_fn = DotProductAttention(num_heads, sink=True, param_dtype=param_dtype)
        super().__init__(
            num_heads,
            *args,
            attention_fn=attention_fn,
            param_dtype=param_dtype,
            rngs=rngs,
            **kwargs,
        )

    def __call__(
        self,
        *args: Any,
        segment_ids: ArrayLike | None = None,
        query_segment_ids: ArrayLike | None = None,
        key_value_segment_ids: ArrayLike | None = None,
        **kwargs: Any,
    ) -> jax.Array:
        """:meth:`flax.nnx.MultiHeadAttention.__call__`, plus segment ids for packed
        sequences: ``segment_ids`` of shape ``(batch..., length)`` for self-attention, or
        ``query_segment_ids`` and ``key_value_segment_ids`` when queries and keys differ;
        a query sees a key only when their ids are equal (see
        :func:`stablelayers.dot_product_attention`), with no ``L x L`` mask formed.

        Raises:
            ValueError: segment ids are given but the ``attention_fn`` never calls
                :func:`stablelayers.dot_product_attention`.
        """
        ids = _layers.segment_keywords(segment_ids, query_segment_ids, key_value_segment_ids)
        name = type(self).__name__
        return _layers.call_with_segment_ids(super().__call__, name, ids, *args, **kwargs)


class LMHead(nnx.Module):
    """An output projection that returns the cross-entropy, as
    :func:`stablelayers.linear_softmax_cross_entropy`: the ``(tokens, vocab)`` logits are
    never formed during training.

    Args:
        in_features: width of the hidden states.
        vocab_size: number of classes.
        use_bias: add a ``(vocab,)`` bias.
        param_dtype: dtype of the parameters.
        rngs: the random generators for the initialisers (``nnx.Linear``'s defaults).
        vocab_axis: the mesh axis the vocabulary is split over (tensor parallelism), or
            ``None``. The kernel and bias then carry Flax's partitioning metadata
            ``(None, vocab_axis)`` and ``(vocab_axis,)`` (``nnx.get_partition_spec``
            reads it; Flax places them so when it creates them) and the loss is
            :func:`stablelayers.linear_softmax_cross_entropy_sharded`: each device walks
            its own columns, no weight or logit is gathered.
        token_axis: the mesh axis the tokens (the first axis of ``hidden``) are split
            over, with ``vocab_axis``; ``None``: replicated.
        mesh: the ``jax.sharding.Mesh``, with ``vocab_axis``; ``None``: the one
            ``jax.set_mesh`` has set when the layer is called.
        **options: the function's keywords (``reduction``, ``label_smoothing``, ``z_loss``,
            ``ignore_index``, ``chunk_size``, ``logits_soft_cap``), checked here; e.g.
            ``logits_soft_cap=30.0`` for Gemma 2's final-logit soft-capping. A training
            loss that is a mean is cheaper as ``reduction='mean'`` (three products, not
            four).

    Attributes:
        kernel: ``nnx.Param`` of shape ``(in_features, vocab_size)`` (``hidden @ kernel``).
        bias: ``nnx.Param`` of shape ``(vocab_size,)``, or ``None``.
    """

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        *,
        use_bias: bool = True,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
        vocab_axis: str | None = None,
        token_axis: str | None = None,
        mesh: Mesh | None = None,
        **options: Any,
    ):
        self.options = _layers.loss_options(options)
        self.parallel = _vocab_parallel.lm_head_parallel(vocab_axis, token_axis, mesh)
        init = nnx.initializers.lecun_normal()
        # Partitioning metadata only when asked: it is what a sharded state is built from
        # (and with a mesh, Flax places the parameters so when it creates them).
        cols: dict[str, Any] = {}
        vocab: dict[str, Any] = {}
        if vocab_axis is not None:
            where = {} if mesh is None else {"mesh": mesh}
            cols = {"out_sharding": (None, vocab_axis), **where}
            vocab = {"out_sharding": (vocab_axis,), **where}
        kernel = init(rngs.params(), (in_features, vocab_size), param_dtype)
        self.kernel = nnx.Param(kernel, **cols)
        bias = jnp.zeros((vocab_size,), param_dtype)
        self.bias = nnx.Param(bias, **vocab) if use_bias else None

    def __call__(self, hidden: ArrayLike, labels: ArrayLike) -> jax.Array:
        """Loss of ``hidden`` ``(..., in_features)`` against integer ``labels`` ``(...)``:
        per token (``reduction='none'``; reduce it with e.g.
        :func:`stablelayers.mean_over_valid`) or a scalar."""
        bias = None if self.bias is None else self.bias[...]
        return _vocab_parallel.lm_head_loss(
            hidden, self.kernel[...], labels, bias, dict(self.options), self.parallel
        )

    def logits(self, hidden: ArrayLike) -> jax.Array:
        """The full logits ``hidden @ kernel + bias``, for evaluation and sampling."""
        out = jnp.asarray(hidden) @ self.kernel[...]
        return out if self.bias is None else out + jnp.broadcast_to(self.bias[...], out.shape)
