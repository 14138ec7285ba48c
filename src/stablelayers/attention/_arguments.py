"""Checks of ``dot_product_attention``'s arguments, and the choice of its path. They run
at trace time, on shapes and dtypes, so a bad argument fails when a function is traced."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from stablelayers._core import checks
from stablelayers._core.arithmetic import compute_dtype
from stablelayers._core.switches import forward_mode_enabled

Shape = tuple[int, ...]


class Inputs(NamedTuple):
    """The arrays of one attention call, checked; the one record of the dense, chunked
    and ring paths. In the public layout: ``query`` ``(batch..., q_len, heads, qk_dim)``,
    ``key`` and ``value`` ``(batch..., kv_len, kv_heads, dim)`` in one dtype, ``bias`` and
    a boolean ``mask`` broadcastable to ``(batch..., heads, q_len, kv_len)``, ``sink``
    ``(batch..., heads)`` in the compute dtype, and int32 lengths of shape ``batch``. The
    chunked path's layout (``_chunked_layout``) holds the same fields laid out for blocks,
    the lengths always given, and the dropout key and rate; the ring's chunk pairs also
    place query 0 at key position ``offset``. Segment ids are int32 ``(batch..., q_len)``
    and ``(batch..., kv_len)`` (``(B, length)`` in the chunked layout): a query sees a
    key only where the two ids are equal."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    sink: jax.Array | None
    q_lengths: jax.Array | None
    kv_lengths: jax.Array | None
    rng: jax.Array | None = None
    rate: jax.Array | None = None
    offset: jax.Array | None = None
    q_segments: jax.Array | None = None
    kv_segments: jax.Array | None = None


class Settings(NamedTuple):
    """What both paths do the same way, checked: the logits' scale, which pairs the
    structure lets through (``_masks.position_mask``), the einsums' precision, dropout
    as ``(rng, rate, broadcast)`` or ``None`` when off, and the logits' soft cap."""

    scale: float
    is_causal: bool
    window: int | None
    lookahead: int | None
    precision: lax.PrecisionLike
    dropout: tuple[jax.Array, ArrayLike, bool] | None
    soft_cap: float | None = None


LOGITS_LAYOUT = "(batch..., heads, q_len, kv_len)"
# Below this many logits per (batch, head) the dense path is as fast and its memory small.
CHUNKED_MIN_LOGITS = 1024 * 1024
# Query and key block sizes of the chunked path, measured on CPU (benchmarks/attention.py).
DEFAULT_CHUNK = (256, 512)


def use_chunked(
    implementation: str | None, q_len: int, kv_len: int, custom_einsum: bool, sows: bool
) -> bool:
    """Whether the chunked path runs: asked for, or chosen by size where it can run."""
    if implementation not in (None, "dense", "chunked", "cudnn"):
        raise ValueError(
            "`implementation` must be None, 'dense', 'chunked' or 'cudnn', got "
            f"{implementation!r}."
        )
    if implementation in ("dense", "cudnn") or q_len == 0 or kv_len == 0:
        return False
    if custom_einsum or sows:
        if implementation == "chunked":
            raise ValueError(
                "The chunked path never forms the attention weights, so it takes neither "
                "custom einsums nor a `module` to sow them into (sow_weights=True); use "
                "implementation='dense' or None."
            )
        return False
    if forward_mode_enabled():
        if implementation == "chunked":
            raise ValueError(
                "The chunked path has a reverse-mode rule only; inside "
                "stablelayers.forward_mode() use implementation='dense' or None."
            )
        return False
    return implementation == "chunked" or q_len * kv_len >= CHUNKED_MIN_LOGITS


def local_window(size: int | Sequence[int]) -> tuple[int, int]:
    """jax.nn's ``local_window_size`` as ``(window, lookahead)``: key ``k`` is visible from
    query ``q`` when ``q - left <= k <= q + right``, that is ``q - k < left + 1`` (the
    look-back ``window``) and ``k - q <= right``; an int is ``(size, size)``."""
    left, right = (size, size) if not isinstance(size, (tuple, list)) else size
    left = checks.positive_int(operator.index(left) + 1, "local_window_size") - 1
    right = checks.positive_int(operator.index(right) + 1, "local_window_size") - 1
    return left + 1, right


def implementation_name(implementation: str | None) -> str | None:
    """jax.nn's ``implementation`` as one of ours."""
    if implementation == "xla":
        # jax.nn's XLA implementation: both of stablelayers' paths are XLA code.
        return None
    return implementation


def block_sizes(chunk_size: int | Sequence[int] | None) -> tuple[int, int]:
    """``(query block, key block)`` from ``chunk_size``: an int for both, or a pair."""
    if chunk_size is None:
        return DEFAULT_CHUNK
    if isinstance(chunk_size, (tuple, list)):
        if len(chunk_size) != 2:
            raise ValueError(
                "`chunk_size` must be an int or a pair (query block, key block), got "
                f"{chunk_size!r}."
            )
        block_q, block_k = (checks.positive_int(n, "chunk_size") for n in chunk_size)
        return block_q, block_k
    size = checks.positive_int(chunk_size, "chunk_size")
    return size, size


def check_arrays(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, dtype: DTypeLike | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``query``, ``key`` and ``value`` as real float arrays in ``dtype``, by default their
    promoted dtype (integers become floats)."""
    query, key, value = (
        checks.as_float_array(a, name)
        for a, name in ((query, "query"), (key, "key"), (value, "value"))
    )
    if dtype is None:
        dtype = jnp.result_type(query.dtype, key.dtype, value.dtype)
    dtype = jnp.dtype(dtype)
    return query.astype(dtype), key.astype(dtype), value.astype(dtype)


def check_sink(sink: ArrayLike, batch: Shape, heads: int, dtype: DTypeLike) -> jax.Array:
    """The sink logits, broadcastable to ``(batch..., heads)``, in the compute dtype of
    inputs in ``dtype``: logits and softmax are at least float32, as float16 logits
    overflow at ``|s| > 65504`` and bfloat16 ones carry 3 significant digits."""
    sink = checks.as_float_array(sink, "sink")
    check_broadcast("sink", sink.shape, (*batch, heads), "(batch..., heads)")
    return sink.astype(compute_dtype(dtype))


def scale_or_default(scale: float | None, qk_dim: int) -> float:
    """The logits' scale: ``scale``, by default ``1 / sqrt(qk_dim)``."""
    return 1.0 / float(qk_dim) ** 0.5 if scale is None else scale


def check_soft_cap(cap: float | None) -> float | None:
    """``logits_soft_cap`` as a positive float, or ``None``. It is static (a Python number,
    as ``scale`` is): the chunked path's blocks are compiled for it."""
    if cap is None:
        return None
    value = checks.concrete_number(cap, "logits_soft_cap")
    if value is None:
        raise TypeError(
            "`logits_soft_cap` must be a Python number, not a traced value: attention "
            "compiles its blocks for one cap (mark it static under jit)."
        )
    if not value > 0.0 or value == float("inf"):
        raise ValueError(f"`logits_soft_cap` must be positive and finite, got {cap!r}.")
    return value


def check_segment_ids(
    segment_ids: ArrayLike | None,
    query_segment_ids: ArrayLike | None,
    key_value_segment_ids: ArrayLike | None,
    batch: Shape,
    q_len: int,
    kv_len: int,
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(query ids, key ids)`` as int32 of shapes ``(batch..., q_len)`` and
    ``(batch..., kv_len)``, or ``(None, None)``: from ``segment_ids`` for self-attention
    (both the same), or from the pair."""
    pair = (query_segment_ids, key_value_segment_ids)
    if segment_ids is not None:
        if any(ids is not None for ids in pair):
            raise ValueError(
                "Give `segment_ids` (self-attention: the same ids for queries and keys) or "
                "the pair `query_segment_ids`, `key_value_segment_ids`, not both."
            )
        if q_len != kv_len:
            raise ValueError(
                f"`segment_ids` are one id per position of queries and keys alike, but there "
                f"are {q_len} queries and {kv_len} keys; give `query_segment_ids` and "
                "`key_value_segment_ids` instead."
            )
        pair = (segment_ids, segment_ids)
    if all(ids is None for ids in pair):
        return None, None
    if any(ids is None for ids in pair):
        raise ValueError(
            "`query_segment_ids` and `key_value_segment_ids` must be given together (a "
            "query sees a key only where their ids are equal)."
        )
    checked = []
    for ids, name, n in (
        (pair[0], "query_segment_ids" if segment_ids is None else "segment_ids", q_len),
        (pair[1], "key_value_segment_ids" if segment_ids is None else "segment_ids", kv_len),
    ):
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"`{name}` must be an integer array, got dtype {ids.dtype}.")
        check_broadcast(name, ids.shape, (*batch, n), "(batch..., length)")
        checked.append(jnp.broadcast_to(ids, (*batch, n)).astype(jnp.int32))
    return checked[0], checked[1]


def check_lengths(lengths: ArrayLike | None, name: str, batch: Shape) -> jax.Array | None:
    """Per-batch lengths as int32 of shape ``batch``, or ``None``."""
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be an integer array, got dtype {lengths.dtype}.")
    check_broadcast(name, lengths.shape, batch, "(batch...)")
    return jnp.broadcast_to(lengths, batch).astype(jnp.int32)


def check_shapes(
    query: jax.Array, key: jax.Array, value: jax.Array
) -> tuple[Shape, int, int, int, int]:
    """``(batch, q_len, heads, kv_len, kv_heads)`` of inputs laid out as
    ``(batch..., length, heads, head_dim)``."""
    if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
        raise ValueError(
            "`query`, `key` and `value` must have the same rank, at least 3 "
            "(batch..., length, heads, head_dim); got shapes "
            f"{query.shape}, {key.shape}, {value.shape}."
        )
    if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        raise ValueError(
            "`query`, `key` and `value` must have the same batch dimensions; got shapes "
            f"{query.shape}, {key.shape}, {value.shape}."
        )
    *batch, q_len, heads, qk_dim = query.shape
    kv_len, kv_heads, _ = key.shape[-3:]
    if key.shape[-1] != qk_dim:
        raise ValueError(
            f"`query` and `key` head dimensions differ: {qk_dim} and {key.shape[-1]}."
        )
    if value.shape[-3:-1] != (kv_len, kv_heads):
        raise ValueError(
            "`key` and `value` must agree in length and number of heads; got shapes "
            f"{key.shape} and {value.shape}."
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"`query` has {heads} heads, which is not a multiple of the {kv_heads} heads "
            "of `key` and `value`."
        )
    return tuple(batch), q_len, heads, kv_len, kv_heads


def check_broadcast(
    name: str, shape: Shape, target: Shape, layout: str = LOGITS_LAYOUT
) -> None:
    if not checks.broadcasts_to(tuple(shape), target):
        raise ValueError(
            f"`{name}` of shape {tuple(shape)} does not broadcast to {target}, which is "
            f"{layout} for these inputs."
        )
