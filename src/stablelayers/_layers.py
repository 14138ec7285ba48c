"""What the Flax NNX, Flax Linen and Equinox layers share: argument checks at construction
and the calls into the core that turn a layer's parameters into core arguments. No
framework is imported here, so each layer module imports only its own framework."""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from stablelayers._core import checks
from stablelayers._core.arithmetic import compute_dtype
from stablelayers.attention import _layer_segments
from stablelayers.losses._linear_cross_entropy import linear_softmax_cross_entropy
from stablelayers.ops._softmax import masked_softmax
from stablelayers.ops._softplus import softplus

Axis = int | Sequence[int] | None


def default_param_dtype(dtype: DTypeLike | None) -> DTypeLike:
    """As ``equinox.nn``: float64 when JAX runs in 64-bit mode, else float32."""
    return jnp.result_type(float) if dtype is None else dtype


def softplus_beta(beta: ArrayLike) -> float:
    """A layer's ``beta``, checked as the functional ``softplus`` checks it, as a float."""
    checks.check_beta(beta)
    return float(beta)  # type: ignore[arg-type]


def log_beta_init(beta: float) -> float:
    """The initial value of a learnable ``log_beta``; every framework starts from this."""
    return math.log(beta)


def learnable_softplus(x: ArrayLike, log_beta: jax.Array) -> jax.Array:
    # exp keeps beta positive whatever the optimiser does, and makes updates relative.
    return softplus(x, jnp.exp(log_beta))


def check_num_heads(num_heads: int | None) -> int | None:
    if num_heads is None:
        return None
    try:
        n = operator.index(num_heads)
    except TypeError:
        raise TypeError(f"`num_heads` must be an int or None, got {num_heads!r}.") from None
    if n < 1:
        raise ValueError(f"`num_heads` must be at least 1, got {n}.")
    return n


def sink_shape(num_heads: int | None) -> tuple[int, ...]:
    """One sink logit per head, or a single one shared by all heads."""
    return () if num_heads is None else (num_heads,)


def heads_masked_softmax(
    logits: ArrayLike,
    where: ArrayLike | None,
    sink: jax.Array | None,
    num_heads: int | None,
) -> jax.Array:
    """masked_softmax over the last axis of ``(batch..., heads, q_len, kv_len)`` logits."""
    logits = checks.as_float_array(logits, "logits")
    if num_heads is not None and (logits.ndim < 3 or logits.shape[-3] != num_heads):
        raise ValueError(
            f"This layer has num_heads={num_heads}, so the logits must have shape "
            f"(batch..., {num_heads}, q_len, kv_len); got shape {logits.shape}."
        )
    if sink is not None:
        # The core returns the sink's gradient in the logits' compute dtype, so cast here
        # and let astype's transpose bring it back to the parameter's dtype.
        sink = sink.astype(compute_dtype(logits.dtype))
        if sink.ndim == 1:
            sink = sink[:, None]  # (heads, 1): broadcast over the query axis.
    return masked_softmax(logits, where=where, sink=sink)


def check_heads(query: ArrayLike, num_heads: int | None) -> None:
    """Raise early when the query's heads axis is not the layer's ``num_heads``."""
    query_shape = jnp.shape(query)
    if num_heads is not None and (len(query_shape) < 3 or query_shape[-2] != num_heads):
        raise ValueError(
            f"This layer has num_heads={num_heads}, so the query must have shape "
            f"(batch..., q_len, {num_heads}, head_dim); got shape {query_shape}."
        )


def forward_signature(
    method: Callable[..., Any], target: Callable[..., Any], drop: tuple[str, ...] = ()
) -> None:
    """Give ``method`` (a layer's ``__call__(self, ...)``) ``target``'s signature less
    ``drop``, so that callers which pass only the keywords a signature names (Flax's
    attention layers inspect their ``attention_fn``) pass all of ``target``'s."""
    parameters = [
        p for name, p in inspect.signature(target).parameters.items() if name not in drop
    ]
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = inspect.Signature([this, *parameters])  # type: ignore[attr-defined]


LossOptions = tuple[tuple[str, Any], ...]


def loss_options(options: dict[str, Any]) -> LossOptions:
    """An LM head's keywords for :func:`stablelayers.linear_softmax_cross_entropy`, checked
    by name when the layer is built, as a hashable tuple (a static field)."""
    taken = {
        name
        for name, p in inspect.signature(linear_softmax_cross_entropy).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("bias", "vocab_mask")
    }
    unknown = sorted(set(options) - taken)
    if unknown:
        raise TypeError(
            f"LMHead got {unknown}, which linear_softmax_cross_entropy does not take; its "
            f"options are {sorted(taken)}."
        )
    return tuple(sorted(options.items()))


def segment_keywords(
    segment_ids: ArrayLike | None,
    query_segment_ids: ArrayLike | None,
    key_value_segment_ids: ArrayLike | None,
) -> dict[str, ArrayLike]:
    """The segment ids a layer was given, by ``dot_product_attention``'s keyword names,
    leaving out those not given."""
    given = {
        "segment_ids": segment_ids,
        "query_segment_ids": query_segment_ids,
        "key_value_segment_ids": key_value_segment_ids,
    }
    return {name: ids for name, ids in given.items() if ids is not None}


def call_with_segment_ids(
    call: Callable[..., Any], layer: str, ids: dict[str, ArrayLike], *args: Any, **kwargs: Any
) -> jax.Array:
    """``call(*args, **kwargs)`` (a Flax attention layer's own ``__call__``) with the
    segment ``ids`` handed to the ``dot_product_attention`` its ``attention_fn`` calls;
    raises if no such call took them."""
    if not ids:
        return cast(jax.Array, call(*args, **kwargs))
    with _layer_segments.handing_over(ids) as handover:
        out = call(*args, **kwargs)
    if not handover.taken:
        raise _layer_segments.not_taken_error(layer)
    return cast(jax.Array, out)
