"""The switch between reverse-mode rules (the default) and forward-mode rules."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_FORWARD_MODE = contextvars.ContextVar("stablelayers_forward_mode", default=False)


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """Trace stablelayers ops with ``jax.custom_jvp`` rules instead of ``jax.custom_vjp``.

    JAX cannot run forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``)
    through a ``jax.custom_vjp`` function; it raises "can't apply forward-mode autodiff
    (jvp) to a custom_vjp function". Inside this context every stablelayers op is built
    from the same primal and the same derivative, written as a tangent map, so forward mode
    works, and reverse mode still works by transposing it. The price: reverse mode may keep
    more than the one output-sized residual that the default rules keep.

    The switch is read when a function is traced. A function that ``jax.jit`` has already
    traced outside the context keeps its old trace, so wrap the first call (the tracing),
    not just later calls::

        with stablelayers.forward_mode():
            jac = jax.jacfwd(stablelayers.softmax)(x)
    """
    token = _FORWARD_MODE.set(True)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def forward_mode_enabled() -> bool:
    """Whether ops traced now use the forward-mode (``custom_jvp``) rules."""
    return _FORWARD_MODE.get()
