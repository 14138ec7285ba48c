"""Calls into the CPU kernels (``_cpu_kernels.cc``), and the switch between them and the
pure-JAX path.

The softmax calls take float32 arrays of shape ``(rows, n)`` and work row by row; per-row
values have shape ``(rows,)``. The softplus calls work entry by entry on any shape. The
derivative rules that make the calls differentiable live in ``_core``, next to the
pure-JAX primal they stand in for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stablelayers import _cpu_library


def _call(
    kernel: str, shapes: list[tuple[int, ...]], *args: jax.Array, **attributes: Any
) -> Any:
    results = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    # vmap adds a leading batch dimension to every argument, which the kernels read as more
    # rows (or entries).
    target = _cpu_library.target_name(kernel)
    call = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")
    return call(*args, **attributes)


def softmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(y, total)``: the softmax of each row and its ``sum(exp(x - max))``."""
    rows = x.shape[:1]
    return tuple(_call("softmax", [x.shape, rows], x))


def softmax_grad(y: jax.Array, g: jax.Array) -> jax.Array:
    """The softmax VJP ``y * (g - sum(g * y))`` from the output ``y``."""
    return _call("softmax_grad", [y.shape], y, g)[0]


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
    return _call("log_softmax_grad", [x.shape], x, shift, rest, g)[0]


def softplus(x: jax.Array, beta: float) -> jax.Array:
    """``log1p(exp(beta * x)) / beta``, entry by entry."""
    return _call("softplus", [x.shape], x, beta=np.float32(beta))[0]


def softplus_grad(y: jax.Array, g: jax.Array, beta: float) -> jax.Array:
    """``g * sigmoid(beta * x)``, read from the output ``y`` as ``-expm1(-beta * y)``."""
    return _call("softplus_grad", [y.shape], y, g, beta=np.float32(beta))[0]


def on_cpu(
    kernel: Callable[..., Any], fallback: Callable[..., Any], *args: Any, decided: bool = False
) -> Any:
    """``kernel(*args)`` where the program runs on the CPU, ``fallback(*args)`` elsewhere.

    Both must return the same shapes and dtypes. The choice is made when the program is
    lowered for a platform, so one traced function serves CPU and GPU alike; where the
    kernels may not be used (see ``_cpu_library.available``), ``fallback`` is all there is.
    ``decided=True`` is for a backward pass whose forward pass already chose to dispatch:
    it must follow that choice, whatever the switches say when it is traced.
    """
    if not decided and not _cpu_library.available():
        return fallback(*args)
    return lax.platform_dependent(*args, cpu=kernel, default=fallback)
