"""The switch between the CPU kernels (the default on the CPU) and the pure-JAX code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

# Part of jax.jit's cache key, so a function traced with the kernels is traced afresh
# inside the context, and the other way round.
_PURE_JAX = jax.make_user_context(default_value=False)


@contextlib.contextmanager
def pure_jax() -> Iterator[None]:
    """Trace stablelayers ops as pure JAX, without the CPU kernels.

    On the CPU, softmax, log_softmax and softplus run compiled kernels, called through
    the XLA FFI, where they apply. A program that holds them cannot be serialised for
    another process: ``jax.export`` refuses custom calls without a compatibility
    guarantee, and so does ``jax2tf``. Inside this context every op is traced from its
    pure-JAX code, which has the same semantics and runs on every platform. Values agree
    with the kernels' to a few float32 ulps; the kernels are the more accurate.

    The switch is read when a function is traced, like
    :func:`stablelayers.forward_mode`, and is part of ``jax.jit``'s cache key: a jitted
    function that has already run with the kernels is traced afresh inside the context::

        with stablelayers.pure_jax():
            exported = jax.export.export(jax.jit(model))(x)

    Setting ``STABLELAYERS_CPU_KERNELS=0`` in the environment does the same for every
    trace.
    """
    with _PURE_JAX(True):
        yield


def pure_jax_enabled() -> bool:
    """Whether ops traced now must be pure JAX (inside :func:`pure_jax`)."""
    return bool(_PURE_JAX.value)
