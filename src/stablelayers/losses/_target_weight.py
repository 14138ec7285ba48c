r"""``q * c`` with ``0 * inf = 0``: a target's weight times its cost, for the losses.

.. math::
    w(q, c) = \begin{cases} q\,c & q \ne 0 \\ 0 & q = 0 \end{cases}, \qquad
    \frac{\partial w}{\partial q} = c, \qquad \frac{\partial w}{\partial c} = q

The value drops a class with no target mass, so an infinite cost there (a ``-inf`` logit
off the target) is no ``0 * inf``; the derivative keeps both factors, so the gradient with
respect to the labels is the cost itself wherever the labels sit, ``q = 0`` included
(distillation and learned soft targets need it). ``jnp.where(q != 0, q * c, 0)`` alone
would send 0 back to every ``q_j = 0``. The rule is that of ``jax.scipy.special.xlogy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_jvp
def target_weight(q: jax.Array, cost: jax.Array) -> jax.Array:
    """``q * cost``, exactly 0 where ``q == 0`` (whatever ``cost`` holds)."""
    return jnp.where(q != 0, q * cost, 0.0)


@target_weight.defjvp
def _target_weight_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    # Linear in the tangents (so reverse mode transposes it, to any order): d(q c) =
    # c dq + q dc. A tangent of the cost is finite wherever the cost is used (only the
    # cost's value may be infinite), so q dc is no 0 * inf where q == 0.
    q, cost = primals
    dq, dcost = tangents
    return target_weight(q, cost), dq * cost + q * dcost
