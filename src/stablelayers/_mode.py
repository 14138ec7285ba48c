"""The switch between reverse-mode rules (the default) and forward-mode rules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

# Part of jax.jit's cache key, so a function jitted outside the context is traced afresh
# inside it (with the forward-mode rules), and the other way round.
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
