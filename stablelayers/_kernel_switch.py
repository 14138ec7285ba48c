"""The switch between the CPU kernels (the default on the CPU) and the pure-JAX code."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_PURE_JAX = contextvars.ContextVar("stablelayers_pure_jax", default=False)


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
    :func:`stablelayers.forward_mode`, so wrap the tracing::

        with stablelayers.pure_jax():
            exported = jax.export.export(jax.jit(model))(x)

    Setting ``STABLELAYERS_CPU_KERNELS=0`` in the environment does the same for every
    trace.
    """
    token = _PURE_JAX.set(True)
    try:
        yield
    finally:
        _PURE_JAX.reset(token)


def pure_jax_enabled() -> bool:
    """Whether ops traced now must be pure JAX (inside :func:`pure_jax`)."""
    return _PURE_JAX.get()
