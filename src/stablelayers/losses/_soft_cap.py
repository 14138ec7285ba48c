r"""Logit soft-capping, ``c tanh(z / c)``, and its derivatives, for both cross-entropies.

.. math::
    \tilde z = c \tanh(u), \quad u = z / c, \qquad
    \frac{\partial \tilde z}{\partial z} = 1 - \tanh^2 u, \qquad
    \frac{\partial \tilde z}{\partial c} = \tanh u - u\,(1 - \tanh^2 u)

The capped logits lie in ``(-c, c)`` and equal ``z`` to first order near 0: Gemma 2's
final-logit soft-capping (Gemma Team, 2024, "Gemma 2: Improving Open Language Models at a
Practical Size", arXiv:2408.00118, section 2, with ``c = 30``; Liger-Kernel's ``softcap``).
An infinite ``z`` gives ``+-c`` with derivative 0 in both ``z`` and ``c`` (the product
``u (1 - tanh^2 u)`` is taken as its limit 0 there, not ``inf * 0``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def slope(t: jax.Array) -> jax.Array:
    """``d(c tanh u)/dz = 1 - t^2`` from ``t = tanh u``, as ``(1 - t)(1 + t)`` (JAX's own
    form for tanh, accurate as ``|t|`` nears 1)."""
    return (1.0 - t) * (1.0 + t)


def cap_derivative(u: jax.Array, t: jax.Array) -> jax.Array:
    """``d(c tanh u)/dc = t - u (1 - t^2)`` at ``u = z / c``, ``t = tanh u``; 0 times an
    infinite ``u`` is 0 (its limit)."""
    s = slope(t)
    return t - jnp.where(s == 0, 0.0, u * s)


def soft_cap(z: jax.Array, cap: float | jax.Array) -> jax.Array:
    """``cap * tanh(z / cap)``, elementwise. A concrete (float) ``cap`` is a constant: plain
    ``jnp`` ops, differentiated as they are; a traced one also gets its derivative, with
    the rule above (a derivative that is zero is not computed)."""
    if isinstance(cap, float):
        return cap * jnp.tanh(z / cap)
    return _traced_soft_cap(z, cap)


@jax.custom_jvp
def _traced_soft_cap(z: jax.Array, cap: jax.Array) -> jax.Array:
    return cap * jnp.tanh(z / cap)


def _soft_cap_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]
) -> tuple[jax.Array, jax.Array]:
    # Linear in the tangents, so reverse mode transposes it (to any order); a symbolic
    # zero tangent (the cap not differentiated) adds no term and keeps no residual.
    z, cap = primals
    z_dot, cap_dot = tangents
    u = z / cap
    t = jnp.tanh(u)
    out = cap * t
    dot = jnp.zeros_like(out)
    if not isinstance(z_dot, SymbolicZero):
        dot = slope(t) * z_dot
    if not isinstance(cap_dot, SymbolicZero):
        dot = dot + cap_derivative(u, t) * cap_dot
    return out, dot


_traced_soft_cap.defjvp(_soft_cap_jvp, symbolic_zeros=True)
