r"""logsumexp of complex input, as ``jax.nn.logsumexp`` computes it.

.. math::
    \mathrm{lse}(a) = m + \log \sum_j b_j e^{a_j - m}, \qquad m = \max_j \mathrm{Re}\, a_j

with the principal branch of the complex log (the imaginary part is defined modulo
``2 pi``); with ``return_sign`` the result is ``log|sum|`` (real) and the sign
``sum / |sum|`` (complex). Shifting by the real part's max keeps ``|e^{a_j - m}| <= 1``, so
nothing overflows. The real path's accurate ``log1p`` form and custom derivative rule do not
carry over (a complex sum has no dominant term to split off), so this is plain JAX,
differentiated by JAX: complex logsumexp is holomorphic, ``d lse / d a_j = b_j e^{a_j - lse}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.checks import Axes


def complex_logsumexp(
    a: jax.Array,
    axes: Axes,
    b: jax.Array | None,
    where: jax.Array | None,
    return_sign: bool,
) -> tuple[jax.Array, jax.Array]:
    """``(lse, sign)`` per row (keepdims) of complex ``a`` (``b`` broadcast to it)."""
    live = jnp.ones(a.shape, bool) if where is None else jnp.broadcast_to(where, a.shape)
    if b is not None:
        live = live & (b != 0)
    real = jnp.where(live, a.real, jnp.finfo(a.real.dtype).min)
    top = jnp.max(real, axis=axes, keepdims=True)
    # The shift cancels in value and derivative (stopped, as in jax.nn.logsumexp).
    shift = lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    e = jnp.exp(jnp.where(live, a, 0.0) - shift.astype(a.dtype))
    if b is not None:
        e = e * b.astype(a.dtype)
    total = jnp.sum(jnp.where(live, e, 0.0), axis=axes, keepdims=True)
    sign = jnp.sign(total)
    if return_sign:
        return jnp.log(jnp.abs(total)) + shift, sign
    return jnp.log(total) + shift.astype(a.dtype), sign
