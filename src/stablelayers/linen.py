"""Flax Linen layers for the stablelayers ops.

Each layer declares its parameters with ``self.param`` and calls the functional core, so it
gives the same numbers as :func:`stablelayers.softmax` and friends, and the same numbers
as the :mod:`stablelayers.nnx` layer of the same name given equal parameters. Only Flax is
imported here; ``stablelayers.equinox`` works without Flax and this module without Equinox.

For attention without sinks no new class is needed: pass
``attention_fn=stablelayers.dot_product_attention`` to
:class:`flax.linen.MultiHeadDotProductAttention`. :class:`MultiHeadDotProductAttention`
here (and its subclass ``MultiHeadAttention``, as Flax has it) does that by
default and adds learnable sinks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.typing import ArrayLike, DTypeLike

from stablelayers import _layers
from stablelayers._core import checks
from stablelayers.attention._api import dot_product_attention
from stablelayers.losses import _vocab_parallel
from stablelayers.losses._linear_cross_entropy import Reduction
from stablelayers.ops._log_softmax import log_softmax
from stablelayers.ops._softmax import softmax
from stablelayers.ops._softplus import softplus

__all__ = [
    "DotProductAttention",
    "LMHead",
    "LogSoftmax",
    "MaskedSoftmax",
    "MultiHeadAttention",
    "MultiHeadDotProductAttention",
    "Softmax",
    "Softplus",
]


class _Rowwise(nn.Module):
    """A softmax-family function over ``axis`` as a layer: ``layer(x, where=None)`` is
    ``function(x, axis=layer.axis, where=where)``."""

    axis: int | tuple[int, ...] | None = -1
    _function: ClassVar[Callable[..., jax.Array]]

    def __post_init__(self) -> None:
        # A tuple, not a list: Linen hashes module attributes (the dataclass is frozen, so
        # object.__setattr__ is the way to normalise a field here).
        object.__setattr__(self, "axis", checks.check_axis(self.axis))
        super().__post_init__()

    def __call__(self, x: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
        """The layer's function of ``x`` (any shape) over ``self.axis``, masked by
        ``where``; an array of ``x``'s shape and dtype."""
        return type(self)._function(x, axis=self.axis, where=where)


class Softmax(_Rowwise):
    """Softmax over ``axis``, as :func:`stablelayers.softmax`: ``layer(x, where=None)``.

    ``where`` (optional, boolean, broadcastable to ``x.shape``) leaves entries out: they get
    exactly 0, and a row with nothing unmasked is all 0.

    Attributes:
        axis: the axis, or tuple of axes, that forms a row; ``None`` for all axes.
    """

    _function = staticmethod(softmax)


class LogSoftmax(_Rowwise):
    """Log-softmax over ``axis``, as :func:`stablelayers.log_softmax`:
    ``layer(x, where=None)``.

    ``where`` (optional, boolean, broadcastable to ``x.shape``) leaves entries out: they are
    ``-inf`` with gradient 0.

    Attributes:
        axis: the axis, or tuple of axes, that forms a row; ``None`` for all axes.
    """

    _function = staticmethod(log_softmax)


class Softplus(nn.Module):
    r"""``log(1 + exp(beta * x)) / beta``, as :func:`stablelayers.softplus`.

    Attributes:
        beta: the initial (or, if not learnable, fixed) positive temperature, a number.
        learnable: make beta a trainable parameter. It is the scalar param ``'log_beta'``,
            initialised to ``log(beta)``, and the layer uses ``beta = exp(log_beta)``, so
            beta stays positive under any update.
        param_dtype: dtype of ``log_beta``.
    """

    beta: float = 1.0
    learnable: bool = False
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self) -> None:
        _layers.softplus_beta(self.beta)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: ArrayLike) -> jax.Array:
        """Softplus of ``x`` with the layer's beta.

        Args:
            x: input of any shape.

        Returns:
            An array of ``x``'s shape and dtype.
        """
        if not self.learnable:
            return softplus(x, float(self.beta))
        init = nn.initializers.constant(_layers.log_beta_init(float(self.beta)))
        log_beta = self.param("log_beta", init, (), self.param_dtype)
        return _layers.learnable_softplus(x, log_beta)


class _SinkOwner(nn.Module):
    """A layer that may own learnable sinks: the param ``'sink'``, one logit per head (or
    one shared), starting at 0."""

    num_heads: int | None = None
    sink: bool = False
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self) -> None:
        _layers.check_num_heads(self.num_heads)
        super().__post_init__()


class MaskedSoftmax(_SinkOwner):
    """:func:`stablelayers.masked_softmax` as a Linen module, ``layer(logits, where=None)``,
    whose optional sinks are the param ``'sink'``. A query row with nothing left is
    exactly 0, with zero gradient.

    Attributes:
        num_heads: the size of the logits' heads axis (``-3``), checked on each call when
            set; it is also the number of sinks, one shared sink when ``None``.
        sink: add a learnable sink logit, the param ``'sink'`` of shape ``(num_heads,)``
            initialised to 0 ("softmax1"), to each row's normaliser (gpt-oss style).
        param_dtype: dtype of the sink.
    """

    @nn.compact
    def __call__(self, logits: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
        """``masked_softmax(logits, where=where, sink=...)`` with the layer's sinks, over the
        key axis of ``(batch..., heads, q_len, kv_len)`` logits."""
        sink = _sink_param(self) if self.sink else None
        return _layers.heads_masked_softmax(logits, where, sink, self.num_heads)


class DotProductAttention(_SinkOwner):
    """:func:`stablelayers.dot_product_attention` as a module that owns learnable sinks.

    Use it as the ``attention_fn`` of :class:`flax.linen.MultiHeadDotProductAttention` to
    give that class sinks (this is what :class:`MultiHeadDotProductAttention` does)::

        nn.MultiHeadDotProductAttention(8, attention_fn=DotProductAttention(8, sink=True))

    Attributes:
        num_heads: the number of query heads; checked on every call when given. With
            ``sink=True`` there is one sink per head; with ``None``, one shared sink.
        sink: hold a learnable sink logit per head, the param ``'sink'``, initialised to 0.
        param_dtype: dtype of the sink.
    """

    # Linen's attention layer passes only the keywords that its attention_fn's signature
    # names, so __call__ carries dot_product_attention's signature (set below the class):
    # every keyword it takes reaches it, none re-listed here.
    @nn.compact
    def __call__(self, query: ArrayLike, *args: Any, **kwargs: Any) -> Any:
        """:func:`stablelayers.dot_product_attention` with the layer's sinks: the function's
        arguments but ``sink``, in its order (``query, key, value, bias, mask, ...``)."""
        sink = _sink_param(self) if self.sink else None
        # The query is checked here and the arguments go straight to the function, so a
        # mask passes through no other module on its way to the softmax.
        _layers.check_heads(query, self.num_heads)
        return cast(jax.Array, dot_product_attention(query, *args, sink=sink, **kwargs))


_layers.forward_signature(DotProductAttention.__call__, dot_product_attention, drop=("sink",))


class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
    """:class:`flax.linen.MultiHeadAttention` on :func:`stablelayers.dot_product_attention`,
    with optional learnable sinks.

    It has every attribute of :class:`flax.linen.MultiHeadDotProductAttention`, is called
    the same way (``sow_weights=True`` included), and has the same parameters, so its
    params load into Flax's class and back. The differences: ``attention_fn`` defaults to
    :func:`stablelayers.dot_product_attention` (a query whose keys are all masked gives
    exactly 0 and no gradient, rather than the mean of the values), and ``sink=True``
    adds one learnable sink logit per head.

    Attributes:
        sink: add a learnable sink per head. ``attention_fn`` becomes a
            :class:`DotProductAttention` submodule, so the sink is the param
            ``params['attention_fn']['sink']``, shape ``(num_heads,)``, initialised to 0.
            Needs the default ``attention_fn``.
        attention_fn: the attention function, by default
            :func:`stablelayers.dot_product_attention`.

    Raises:
        ValueError: ``sink=True`` together with a custom ``attention_fn``.
    """

    attention_fn: Callable[..., jax.Array] = dot_product_attention
    sink: bool = False

    def __post_init__(self) -> None:
        # A clone passes the DotProductAttention built here back in, so accept it.
        if self.sink and not isinstance(self.attention_fn, DotProductAttention):
            if self.attention_fn is not dot_product_attention:
                raise ValueError(
                    "sink=True puts the sinks in a DotProductAttention submodule that "
                    "replaces `attention_fn`; leave `attention_fn` at its default, or pass "
                    "attention_fn=DotProductAttention(num_heads, sink=True) yourself."
                )
            # parent=None: built unbound, then adopted as the child 'attention_fn' like any
            # submodule attribute, rather than bound to whichever module is being run.
            attention_fn = DotProductAttention(
                self.num_heads, sink=True, param_dtype=self.param_dtype, parent=None
            )
            # The dataclass is frozen: object.__setattr__ is how __post_init__ sets a field.
            object.__setattr__(self, "attention_fn", attention_fn)
        super().__post_init__()

    def __call__(
        self,
        *args: Any,
        segment_ids: ArrayLike | None = None,
        query_segment_ids: ArrayLike | None = None,
        key_value_segment_ids: ArrayLike | None = None,
        **kwargs: Any,
    ) -> jax.Array:
        """:meth:`flax.linen.MultiHeadDotProductAttention.__call__`, plus segment ids for
        packed sequences: ``segment_ids`` of shape ``(batch..., length)`` for
        self-attention, or ``query_segment_ids`` and ``key_value_segment_ids`` when
        queries and keys differ; a query sees a key only when their ids are equal (see
        :func:`stablelayers.dot_product_attention`), with no ``L x L`` mask formed.

        Raises:
            ValueError: segment ids are given but the ``attention_fn`` never calls
                :func:`stablelayers.dot_product_attention`.
        """
        ids = _layers.segment_keywords(segment_ids, query_segment_ids, key_value_segment_ids)
        name = type(self).__name__
        return _layers.call_with_segment_ids(super().__call__, name, ids, *args, **kwargs)


class MultiHeadAttention(MultiHeadDotProductAttention):
    """:class:`MultiHeadDotProductAttention` under Flax's other name, as
    :class:`flax.linen.MultiHeadAttention` is: the same layer, auto-named
    ``MultiHeadAttention_N`` in a parent module (Flax's subclass is named so too), so a
    model that held Flax's ``MultiHeadAttention`` keeps its parameter paths, its dropout
    draws (Linen folds the module's name into its RNG) and its checkpoints."""


def _sink_param(module: nn.Module) -> jax.Array:
    shape = _layers.sink_shape(module.num_heads)
    return module.param("sink", nn.initializers.zeros_init(), shape, module.param_dtype)


class LMHead(nn.Module):
    """An output projection that returns the cross-entropy, as
    :func:`stablelayers.linear_softmax_cross_entropy`: the ``(tokens, vocab)`` logits are
    never formed during training.

    Attributes:
        vocab_size: number of classes.
        use_bias: add a ``(vocab,)`` bias.
        chunk_size: block size (``None``: the function's default).
        label_smoothing, z_loss, ignore_index: as in the function.
        logits_soft_cap: ``None`` (no cap) or ``c > 0``: the loss of ``c tanh(z / c)``,
            as in the function (Gemma 2's final-logit soft-capping, ``c = 30``).
        reduction: ``'none'`` (per token), ``'mean'`` or ``'sum'``, as in the function; a
            training loss that is a mean is cheaper as ``'mean'`` (three products, not
            four).
        param_dtype: dtype of the parameters ``kernel`` ``(hidden, vocab)`` and ``bias``.
        vocab_axis: the mesh axis the vocabulary is split over (tensor parallelism), or
            ``None``. The kernel and bias are then declared with
            ``nn.with_partitioning`` as ``(None, vocab_axis)`` and ``(vocab_axis,)``
            (``nn.get_partition_spec`` of the variables gives their specs) and the loss
            is :func:`stablelayers.linear_softmax_cross_entropy_sharded`: each device
            walks its own columns, no weight or logit is gathered.
        token_axis: the mesh axis the tokens (the first axis of ``hidden``) are split
            over, with ``vocab_axis``; ``None``: replicated.
        mesh: the ``jax.sharding.Mesh``, with ``vocab_axis``; ``None``: the one
            ``jax.set_mesh`` has set.
    """

    vocab_size: int
    use_bias: bool = True
    chunk_size: int | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    ignore_index: int | None = None
    reduction: Reduction = "none"
    param_dtype: Any = jnp.float32
    logits_soft_cap: float | None = None
    vocab_axis: str | None = None
    token_axis: str | None = None
    mesh: Any = None

    def _params(self, width: int) -> tuple[jax.Array, jax.Array | None]:
        init: Any = nn.initializers.lecun_normal()
        zeros: Any = nn.initializers.zeros
        if self.vocab_axis is not None:
            init = nn.with_partitioning(init, (None, self.vocab_axis))
            zeros = nn.with_partitioning(zeros, (self.vocab_axis,))
        kernel = self.param("kernel", init, (width, self.vocab_size), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", zeros, (self.vocab_size,), self.param_dtype)
        return kernel, bias

    @nn.compact
    def __call__(self, hidden: ArrayLike, labels: ArrayLike) -> jax.Array:
        """Loss of ``hidden`` ``(..., width)`` against integer ``labels`` ``(...)``: per
        token (``reduction='none'``; reduce it with e.g.
        :func:`stablelayers.mean_over_valid`) or a scalar."""
        hidden = jnp.asarray(hidden)
        kernel, bias = self._params(hidden.shape[-1])
        options = dict(
            chunk_size=self.chunk_size,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            logits_soft_cap=self.logits_soft_cap,
        )
        parallel = _vocab_parallel.lm_head_parallel(self.vocab_axis, self.token_axis, self.mesh)
        return _vocab_parallel.lm_head_loss(hidden, kernel, labels, bias, options, parallel)

    @nn.compact
    def logits(self, hidden: ArrayLike) -> jax.Array:
        """The full logits ``hidden @ kernel + bias``, for evaluation and sampling (call
        with ``method="logits"``)."""
        hidden = jnp.asarray(hidden)
        kernel, bias = self._params(hidden.shape[-1])
        out = hidden @ kernel
        return out if bias is None else out + jnp.broadcast_to(bias, out.shape)
