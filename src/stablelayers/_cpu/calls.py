"""Calls into the CPU kernels (``_cpu_kernels.cc``), the switch between them and the
pure-JAX path, and the wrapper that gives a call its pure-JAX twin's derivative.

The softmax calls take float32 arrays of shape ``(rows, n)`` and work row by row; per-row
values have shape ``(rows,)``. The softplus calls work entry by entry on any shape. Each
op's module says where its kernels apply and which pure-JAX function each stands in for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stablelayers._core.arithmetic import compute_dtype
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers._cpu import library

T = TypeVar("T")


def _call(
    kernel: str, shapes: list[tuple[int, ...]], *args: jax.Array, **attributes: Any
) -> Any:
    results = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    # vmap adds a leading batch dimension to every argument, which the kernels read as more
    # rows (or entries).
    target = library.target_name(kernel)
    call = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")
    return call(*args, **attributes)


def softmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(y, total)``: the softmax of each row and its ``sum(exp(x - max))``."""
    rows = x.shape[:1]
    return tuple(_call("softmax", [x.shape, rows], x))


def softmax_grad(y: jax.Array, g: jax.Array) -> jax.Array:
    """The softmax VJP ``y * (g - sum(g * y))`` from the output ``y``."""
    return cast(jax.Array, _call("softmax_grad", [y.shape], y, g)[0])


def log_softmax(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, shift, rest)``: the log-softmax of each row and its log-sum-exp as a float pair
    (``shift + rest``); ``rest`` is NaN in a row without a finite max, or with a NaN."""
    rows = x.shape[:1]
    return tuple(_call("log_softmax", [x.shape, rows, rows], x))


def log_softmax_grad(
    x: jax.Array, shift: jax.Array, rest: jax.Array, g: jax.Array
) -> jax.Array:
    """The log-softmax VJP ``g - softmax(x) * sum(g)`` from the input and the forward pass's
    ``(shift, rest)``."""
    return cast(jax.Array, _call("log_softmax_grad", [x.shape], x, shift, rest, g)[0])


def softplus(x: jax.Array, beta: float) -> jax.Array:
    """``log1p(exp(beta * x)) / beta``, entry by entry."""
    return cast(jax.Array, _call("softplus", [x.shape], x, beta=np.float32(beta))[0])


def softplus_grad(y: jax.Array, g: jax.Array, beta: float) -> jax.Array:
    """``g * sigmoid(beta * x)``, read from the output ``y`` as ``-expm1(-beta * y)``."""
    result = _call("softplus_grad", [y.shape], y, g, beta=np.float32(beta))
    return cast(jax.Array, result[0])


def kernels_take(x: jax.Array) -> bool:
    """Whether the CPU kernels can take ``x``'s entries: float32 work (half precision
    included), and at least one entry."""
    return compute_dtype(x.dtype) == jnp.float32 and x.size > 0


def rows_apply(x: jax.Array, axis: tuple[int, ...]) -> bool:
    """Whether the row kernels can take ``x``: entries they take (``kernels_take``) over
    trailing axes, so that each row is contiguous."""
    trailing = axis == tuple(range(x.ndim - len(axis), x.ndim))
    return kernels_take(x) and trailing


def as_rows(a: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    """``a`` as a float32 ``(rows, n)`` array, each row one softmax row (axes trailing)."""
    n = math.prod(a.shape[i] for i in axis)
    return a.astype(jnp.float32).reshape(-1, n)


def from_rows(rows: jax.Array, like: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    """Per-row values ``(rows,)`` in the keepdims shape of a reduction of ``like``."""
    return rows.reshape(tuple(1 if i in axis else n for i, n in enumerate(like.shape)))


def no_tangent(a: jax.Array) -> jax.Array:
    """A zero with no derivative: a per-row value a backward kernel reads, whose
    derivative it takes through the input instead."""
    return lax.stop_gradient(jnp.zeros_like(a))


F = TypeVar("F", bound=Callable[..., Any])


def differentiable_as(
    reference: Callable[..., Any], nondiff_argnums: tuple[int, ...] = ()
) -> Callable[[F], F]:
    """Make a kernel call differentiable to any order: its derivative is ``reference``'s,
    the pure-JAX function it stands in for (same arguments, same output structure). The
    arguments at ``nondiff_argnums`` are constants (a Python ``beta``): both functions get
    them as they are, and they have no derivative."""

    def wrap(kernel: F) -> F:
        op = jax.custom_jvp(kernel, nondiff_argnums=nondiff_argnums)

        def merged(constants: list[Any], primals: tuple[jax.Array, ...]) -> list[Any]:
            arguments: list[Any] = list(primals)
            for position, constant in zip(nondiff_argnums, constants, strict=True):
                arguments.insert(position, constant)
            return arguments

        @op.defjvp
        @allow_rank_promotion
        def rule(*args: Any) -> tuple[Any, Any]:
            # custom_jvp passes the constants first, then the primals and tangents.
            *constants, primals, tangents = args

            def differentiable(*primals: jax.Array) -> Any:
                return reference(*merged(constants, primals))

            value = op(*merged(constants, primals))
            return value, jax.jvp(differentiable, primals, tangents)[1]

        return cast(F, op)

    return wrap


def on_cpu(
    kernel: Callable[..., T], fallback: Callable[..., T], kernels: bool, *args: Any
) -> T:
    """``kernel(*args)`` where the program runs on the CPU, ``fallback(*args)`` elsewhere
    or when ``kernels`` is false.

    Both must return the same shapes and dtypes. ``kernels`` is decided once, when an op is
    called (``library.available()``), and reaches its forward and backward rules as the
    same static argument, so a backward pass always follows its forward pass's choice. The
    choice between CPU and other platforms is made when the program is lowered, so one
    traced function serves CPU and GPU alike.
    """
    if not kernels:
        return fallback(*args)
    return cast(T, lax.platform_dependent(*args, cpu=kernel, default=fallback))
