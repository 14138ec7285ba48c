"""The Equinox multi-head attention layer (re-exported by ``stablelayers.equinox``): a
drop-in for :class:`equinox.nn.MultiheadAttention` that computes attention with
:func:`stablelayers.dot_product_attention` and can have learnable sinks. Only Equinox is
imported here."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, PRNGKeyArray

from stablelayers import _layers
from stablelayers.attention._api import dot_product_attention

_ProcessHeads = Callable[[Array, Array, Array], tuple[Array, Array, Array]]


class MultiheadAttention(eqx.Module):
    r"""A drop-in for [`equinox.nn.MultiheadAttention`][] that computes attention with
    [`stablelayers.dot_product_attention`][], optionally with learnable sinks.

    Constructor, call and fields are those of `equinox.nn.MultiheadAttention`, and the
    same `key` gives the same weights. Two things differ:

    - a query whose keys are all masked (a padded position) gives exactly 0 after the
      attention (so exactly the output bias, 0 by default) and passes no gradient, where
      `equinox.nn.MultiheadAttention` returns the mean of the values;
    - `sink=True` adds one learnable logit per head to the softmax normaliser (gpt-oss
      style): the field `sink` of shape `(num_heads,)`, starting at 0.

    Otherwise the outputs agree to float rounding, dropout included: the same `key` drops
    the same attention weights (one key per head from `split(key, num_heads)`, as Equinox).
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
        dtype: DTypeLike | None = None,
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
        dtype = _layers.default_param_dtype(dtype)
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
        is_causal: bool = False,
        segment_ids: Array | None = None,
        query_segment_ids: Array | None = None,
        key_value_segment_ids: Array | None = None,
        logits_soft_cap: float | None = None,
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
        - `is_causal`: also mask key `k` from query `q` when `k > q`, without a mask
            array. (Keyword only argument; not in Equinox's layer.)
        - `segment_ids`: packed sequences in self-attention: int ids of shape
            `(seq_length,)`; a query sees a key only when their ids are equal, and no
            `(seq_length, seq_length)` array is formed on the chunked path. (Keyword only
            argument; not in Equinox's layer.)
        - `query_segment_ids`, `key_value_segment_ids`: the ids of queries and keys when
            they differ, shapes `(query_seq_length,)` and `(kv_seq_length,)`; a query whose
            id no key has gives exactly 0 before the output projection.
        - `logits_soft_cap`: optional positive float `c`: logits `c * tanh(s / c)`
            (Gemma 2). (Keyword only argument; not in Equinox's layer.)

        **Returns:**

        A JAX array of shape `(query_seq_length, output_size)`.
        """
        if deterministic is not None:
            inference = deterministic
            warnings.warn(
                "MultiheadAttention()(deterministic=...) is deprecated in favour of "
                "MultiheadAttention()(inference=...)",
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

        options = dict(
            _layers.segment_keywords(segment_ids, query_segment_ids, key_value_segment_ids),
            is_causal=is_causal,
            logits_soft_cap=logits_soft_cap,
        )
        if no_dropout:
            attn = dot_product_attention(
                query_heads, key_heads, value_heads, mask=mask, sink=self.sink, **options
            )
        else:
            assert key is not None  # checked above whenever dropout is on
            attn = self._dropped_attention(
                query_heads, key_heads, value_heads, mask, key, options
            )
        return jax.vmap(self.output_proj)(attn.reshape(q_len, -1))

    def _dropped_attention(
        self,
        query: Array,
        key_: Array,
        value: Array,
        mask: Array | None,
        key: Array,
        options: dict[str, Any],
    ) -> Array:
        """Attention with dropout drawn as `equinox.nn.MultiheadAttention` draws it: one key
        per head from `split(key, num_heads)`, and each head's `(q_len, kv_len)` weights
        kept with a Bernoulli draw of that key, so the same key drops the same weights."""
        rate = self.dropout.p

        def one_head(
            q: Array,
            k: Array,
            v: Array,
            head_mask: Array | None,
            sink: Array | None,
            rng: Array,
        ) -> Array:
            out = dot_product_attention(
                q[:, None],
                k[:, None],
                v[:, None],
                mask=head_mask,
                sink=None if sink is None else sink[None],
                dropout_rng=rng,
                dropout_rate=rate,
                # One head: its (q_len, kv_len) draw is Equinox's draw for that head.
                broadcast_dropout=True,
                deterministic=False,
                **options,
            )
            return cast(Array, out)[:, 0]

        mask_axis = 0 if mask is not None and jnp.ndim(mask) == 3 else None
        sink_axis = None if self.sink is None else 0
        heads = jax.vmap(one_head, in_axes=(1, 1, 1, mask_axis, sink_axis, 0), out_axes=1)
        return heads(query, key_, value, mask, self.sink, jax.random.split(key, self.num_heads))

    def _project(self, proj: eqx.nn.Linear, x: Array) -> Array:
        return jax.vmap(proj)(x).reshape(x.shape[0], self.num_heads, -1)


# stablelayers' other layers spell it MultiHeadAttention (as Flax does); both names work.
MultiHeadAttention = MultiheadAttention
