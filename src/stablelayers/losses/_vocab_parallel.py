"""linear_softmax_cross_entropy_sharded: the vocabulary-parallel fused loss for
``jax.jit`` users, the ``shard_map`` done for them (as ``ring_attention_sharded`` does it
for attention)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec
from jax.typing import ArrayLike

from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.losses._cross_entropy import Reduction, check_reduction
from stablelayers.losses._linear_cross_entropy import linear_softmax_cross_entropy

_spec = cast(Callable[..., PartitionSpec], PartitionSpec)  # untyped in jax.sharding
_OPTIONS = ("label_smoothing", "z_loss", "logits_soft_cap")
_psum = cast(Callable[[jax.Array, str], jax.Array], lax.psum)


def _check_axis(mesh: Mesh | AbstractMesh, axis: str | None, what: str) -> None:
    if axis is not None and axis not in mesh.axis_names:
        raise ValueError(f"`{what}` {axis!r} is not an axis of the mesh {mesh.axis_names}.")


@allow_rank_promotion
def linear_softmax_cross_entropy_sharded(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    mesh: Mesh | AbstractMesh | None,
    axis_name: str,
    token_axis: str | None = None,
    bias: ArrayLike | None = None,
    vocab_mask: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: Reduction = "none",
    **options: Any,
) -> jax.Array:
    """:func:`linear_softmax_cross_entropy` with the vocabulary split over ``mesh``'s
    ``axis_name``, on whole arrays: ``shard_map`` with ``weight`` split
    ``P(None, axis_name)`` (``bias`` and ``vocab_mask`` ``P(axis_name)``) and the tokens
    (the first axis of ``hidden`` and ``labels``) split over ``token_axis`` if given
    (data parallelism), the rest of ``hidden`` replicated. Each device runs the blocked
    loss over its own columns and the shards combine exactly
    (``linear_softmax_cross_entropy(..., axis_name=...)``): no all-gather of the weight or
    of the logits, in the value or the gradient, whatever sharding ``jit`` gave the
    arguments (they are moved to these specs first if they are elsewhere).

    Args:
        hidden: ``(tokens..., hidden)``; the first axis is split over ``token_axis``.
        weight: ``(hidden, V)``, ``V`` a multiple of the size of ``axis_name``.
        labels: integers of ``hidden``'s shape without its last axis, in ``[0, V)``.
        mesh: the mesh (``jax.sharding.Mesh``), or ``None``: the one ``jax.set_mesh``
            has set.
        axis_name: the mesh axis that splits the vocabulary (tensor parallelism).
        token_axis: the mesh axis that splits the tokens, or ``None``.
        bias, vocab_mask, ignore_index: as :func:`linear_softmax_cross_entropy`.
        reduction: ``'none'``, ``'mean'`` (over every token not ignored, on all devices)
            or ``'sum'``: each device sums its tokens, and a ``psum`` over
            ``token_axis`` sums the devices'.
        **options: ``label_smoothing``, ``z_loss``, ``logits_soft_cap``, ``chunk_size``
            (on each device, as :func:`linear_softmax_cross_entropy` with ``axis_name``).

    Returns:
        As :func:`linear_softmax_cross_entropy`; ``'none'`` comes split as the tokens.
    """
    check_reduction(reduction)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                "linear_softmax_cross_entropy_sharded needs a `mesh`, or one set by "
                "jax.set_mesh."
            )
    _check_axis(mesh, axis_name, "axis_name")
    _check_axis(mesh, token_axis, "token_axis")
    if axis_name == token_axis:
        raise ValueError("`axis_name` and `token_axis` must be different mesh axes.")
    h, w, y = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels)
    n = mesh.shape[axis_name]
    if w.ndim != 2 or w.shape[1] % n:
        raise ValueError(
            f"`weight` must be (hidden, vocab) with vocab a multiple of the {n} devices of "
            f"{axis_name!r}, got {w.shape}; pad the vocabulary (and mask the padding with "
            "`vocab_mask`)."
        )
    if h.ndim < 2:
        raise ValueError(f"`hidden` must be (tokens..., hidden), got {h.shape}.")
    unknown = sorted(set(options) - {*_OPTIONS, "chunk_size"})
    if unknown:
        raise TypeError(f"Unknown keywords {unknown}.")
    # Options that are numbers stay static (a concrete 0 leaves its term out); traced ones
    # enter the shard_map replicated.
    static = {k: v for k, v in options.items() if k == "chunk_size" or _is_number(v)}
    traced = {k: jnp.asarray(v) for k, v in options.items() if k not in static}
    tokens = _spec(token_axis)
    vocab = _spec(axis_name)
    named: dict[str, jax.Array] = {}
    specs: list[PartitionSpec] = []
    for name, x, spec in (("bias", bias, vocab), ("vocab_mask", vocab_mask, vocab)):
        if x is not None:
            named[name] = jnp.asarray(x)
            specs.append(spec)
    for name, x in traced.items():
        named[name] = x
        specs.append(_spec())

    # 'mean' and 'sum': each device sums its tokens, and the data axis sums the devices';
    # the mean divides by every device's count.
    inner: Reduction = "none" if reduction == "none" else "sum"

    def local(h: jax.Array, w: jax.Array, y: jax.Array, *rest: jax.Array) -> jax.Array:
        kwargs = dict(zip(named, rest, strict=True))
        out = linear_softmax_cross_entropy(
            h,
            w,
            y,
            axis_name=axis_name,
            ignore_index=ignore_index,
            reduction=inner,
            **cast(dict[str, Any], kwargs),
            **static,
        )
        if inner == "sum" and token_axis is not None:
            out = _psum(out, token_axis)
        return out

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, _spec(None, axis_name), tokens, *specs),
        out_specs=tokens if inner == "none" else _spec(),
    )
    total = sharded(h, w, y, *named.values())
    if reduction != "mean":
        return total
    counted = jnp.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    if vocab_mask is not None:
        counted = counted & jnp.any(jnp.asarray(vocab_mask))
    return total / jnp.maximum(jnp.sum(counted), 1).astype(total.dtype)


def _is_number(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def lm_head_loss(
    hidden: ArrayLike,
    weight: jax.Array,
    labels: ArrayLike,
    bias: jax.Array | None,
    options: dict[str, Any],
    parallel: tuple[Mesh | AbstractMesh | None, str, str | None] | None,
) -> jax.Array:
    """The LM head layers' loss: :func:`linear_softmax_cross_entropy`, or with
    ``parallel = (mesh, vocab_axis, token_axis)`` the sharded entry point."""
    if parallel is None:
        return linear_softmax_cross_entropy(hidden, weight, labels, bias=bias, **options)
    mesh, vocab_axis, token_axis = parallel
    return linear_softmax_cross_entropy_sharded(
        hidden,
        weight,
        labels,
        mesh=mesh,
        axis_name=vocab_axis,
        token_axis=token_axis,
        bias=bias,
        **options,
    )


def lm_head_parallel(
    vocab_axis: str | None, token_axis: str | None, mesh: Mesh | AbstractMesh | None
) -> tuple[Mesh | AbstractMesh | None, str, str | None] | None:
    """An LM head's vocabulary-parallel settings, checked when it is built (a static,
    hashable field), or ``None`` without ``vocab_axis``."""
    if vocab_axis is None:
        if token_axis is not None or mesh is not None:
            raise ValueError("LMHead: `token_axis` and `mesh` need a `vocab_axis`.")
        return None
    if mesh is not None:
        _check_axis(mesh, vocab_axis, "vocab_axis")
        _check_axis(mesh, token_axis, "token_axis")
    return (mesh, vocab_axis, token_axis)
