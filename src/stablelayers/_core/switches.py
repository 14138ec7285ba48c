"""The two trace-time switches: forward-mode rules instead of reverse-mode ones
(:func:`forward_mode`), and pure JAX instead of the CPU kernels (:func:`pure_jax`).

Each is a ``jax.make_user_context``, part of ``jax.jit``'s cache key, so a function jitted
outside a context is traced afresh inside it, and the other way round."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_FORWARD_MODE = jax.make_user_context(default_value=False)


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """Trace stablelayers ops with ``jax.custom_jvp`` rules instead of ``jax.custom_vjp``.

    JAX cannot run forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``)
    through a ``jax.custom_vjp`` function; it raises "can't apply forward-mode autodiff
    (jvp) to a custom_vjp function". Inside this context every stablelayers op is built
    from the same primal and the same derivative, written as a tangent map, so forward mode
    works, and reverse mode still works by transposing it. The price: reverse mode may keep
    more than the one output-sized residual that the default rules keep.

    The switch is read when a function is traced, and it is part of ``jax.jit``'s cache
    key: a jitted function that has already run outside the context is traced afresh
    inside it. Wrap the tracing, that is the call that transforms or runs the function::

        with stablelayers.forward_mode():
            jac = jax.jacfwd(stablelayers.softmax)(x)
    """
    with _FORWARD_MODE(True):
        yield


def forward_mode_enabled() -> bool:
    """Whether ops traced now use the forward-mode (``custom_jvp``) rules."""
    return bool(_FORWARD_MODE.value)


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
