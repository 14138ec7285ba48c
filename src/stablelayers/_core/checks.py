"""Argument checks shared by the public functions. They run at trace time, on shapes and
dtypes only, so a bad argument fails when a function is traced rather than giving a silent
wrong answer."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

# An axis argument as the public functions take it, and the form the ops and the row shift
# take: sorted, distinct and non-negative (what canonical_axis returns).
Axis = int | Sequence[int] | None
Axes = tuple[int, ...]


def as_float_array(x: ArrayLike, name: str = "x") -> jax.Array:
    """``x`` as a JAX array of a float dtype, promoted as ``jax.nn`` promotes: booleans and
    integers of up to 32 bits become float32, 64-bit integers the default float type
    (float64 under ``jax_enable_x64``)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32 if x.dtype.itemsize <= 4 else jnp.result_type(float))
    return x


def check_axis(axis: int | Sequence[int] | None) -> int | tuple[int, ...] | None:
    """``axis`` as an int, a tuple of distinct ints, or ``None`` for every axis. The range
    is checked against an input by ``canonical_axis``; layers check this much when built."""
    if axis is None:
        return None
    if isinstance(axis, bool):
        raise TypeError(f"`axis` must be an int or a tuple of ints, got {axis!r}.")
    if isinstance(axis, (int, np.integer)):
        return int(axis)
    try:
        axes = tuple(operator.index(a) for a in axis)
    except TypeError:
        raise TypeError(f"`axis` must be an int or a tuple of ints, got {axis!r}.") from None
    if len(set(axes)) != len(axes):
        raise ValueError(f"`axis` {axis!r} names the same dimension twice.")
    return axes


def canonical_axis(axis: Axis, ndim: int) -> Axes:
    """``axis`` as a sorted tuple of non-negative ints, checked against ``ndim``; ``None``
    means every axis, as in ``jax.nn.softmax``."""
    checked = check_axis(axis)
    if checked is None:
        return tuple(range(ndim))
    axes = (checked,) if isinstance(checked, int) else checked
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`axis` {a} is out of range for an input with {ndim} dimensions; "
                f"use an axis in [{-ndim}, {ndim - 1}]."
            )
    canonical = tuple(sorted(a % ndim for a in axes))
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"`axis` {axis!r} names the same dimension twice.")
    return canonical


def prepare_rows(
    x: ArrayLike,
    axis: Axis,
    where: ArrayLike | None,
    initial: ArrayLike | None,
) -> tuple[jax.Array, Axes, jax.Array | None]:
    """The softmax family's arguments checked: ``(x, axis, where)`` as the ops take them,
    ``initial`` validated and dropped (the ops always shift by the row max)."""
    x = as_float_array(x)
    axes = canonical_axis(axis, x.ndim)
    mask = check_where(where, x.shape)
    check_initial(initial, reduced_shape(x.shape, axes))
    return x, axes, mask


def check_where(
    where: ArrayLike | None, shape: tuple[int, ...], name: str = "where"
) -> jax.Array | None:
    """``where`` (the argument ``name``) as a boolean array that broadcasts to ``shape``,
    or ``None``."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"`{name}` must be a boolean mask, got dtype {where.dtype}; pass a comparison "
            "such as `lengths[:, None] > jnp.arange(n)`, or `mask.astype(bool)`."
        )
    if not broadcasts_to(where.shape, shape):
        raise ValueError(
            f"`{name}` of shape {where.shape} does not broadcast to the input's shape {shape}."
        )
    return where


def reduced_shape(shape: tuple[int, ...], axis: Axes) -> tuple[int, ...]:
    """``shape`` with the reduced axes kept as size 1 (``keepdims=True``)."""
    return tuple(1 if i in axis else n for i, n in enumerate(shape))


def check_sink(sink: ArrayLike | None, shape: tuple[int, ...], axis: Axes) -> jax.Array | None:
    """``sink`` broadcast to one logit per row, with the softmax axes kept as size 1."""
    if sink is None:
        return None
    sink = as_float_array(sink, "sink")
    rows = tuple(n for i, n in enumerate(shape) if i not in axis)
    if not broadcasts_to(sink.shape, rows):
        raise ValueError(
            f"`sink` of shape {sink.shape} does not broadcast to {rows}, the input's shape "
            f"{shape} without the softmax axis {axis}: give one sink logit per row."
        )
    return jnp.broadcast_to(sink, rows).reshape(reduced_shape(shape, axis))


def check_initial(initial: ArrayLike | None, shape: tuple[int, ...]) -> None:
    """``initial`` must be a real value that broadcasts to one value per row."""
    if initial is None:
        return
    initial = jnp.asarray(initial)
    if not jnp.issubdtype(initial.dtype, jnp.integer) and not jnp.issubdtype(
        initial.dtype, jnp.floating
    ):
        raise TypeError(f"`initial` must be a real number, got dtype {initial.dtype}.")
    if not broadcasts_to(initial.shape, shape):
        raise ValueError(
            f"`initial` of shape {initial.shape} does not broadcast to {shape}, one value "
            "per row."
        )


def check_beta(beta: ArrayLike) -> None:
    """A concrete ``beta`` (a Python, NumPy or JAX number or array) must be real, positive
    and finite; a traced one is the caller's to keep so."""
    try:
        values = np.asarray(beta)
    except (TypeError, jax.errors.TracerArrayConversionError):
        return
    if values.dtype == object:
        return
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise TypeError(f"`beta` must be a positive real number, got {beta!r}.")
    if not np.all((values > 0) & np.isfinite(values)):
        raise ValueError(
            f"`beta` must be positive and finite, got {beta!r}: softplus(x, beta) divides "
            "by beta, and an infinite beta has no softplus (its limit is relu)."
        )


def concrete_number(value: ArrayLike, name: str) -> float | None:
    """A Python, NumPy or JAX scalar as a float, or ``None`` when it is traced (its value
    is not known until run time)."""
    try:
        array = np.asarray(value)
    except (TypeError, jax.errors.TracerArrayConversionError):
        return None
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    if np.iscomplexobj(array):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    return float(array)


def positive_int(value: object, name: str) -> int:
    """A Python, NumPy or concrete JAX integer scalar that is at least 1, as an int."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.") from None
    if number < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return number


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    tail = target[len(target) - len(shape) :]
    return all(n in (1, t) for n, t in zip(shape, tail, strict=True))


def sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum a cotangent over the axes along which an argument of ``shape`` was broadcast
    to ``t.shape``."""
    extra = t.ndim - len(shape)
    t = jnp.sum(t, axis=tuple(range(extra))) if extra else t
    kept = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return jnp.sum(t, axis=kept, keepdims=True) if kept else t
