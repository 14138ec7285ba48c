r"""sigmoid and log_sigmoid, exact at 0 and at +-inf.

``jax.nn.sigmoid``'s gradient is NaN at ``+-inf`` under some compositions (jax #2107,
pytorch #135359: ``exp(inf) / (1 + exp(inf))`` in a branch that a ``where`` discards still
poisons the gradient). Here every branch is finite everywhere:
``sigmoid(x) = 1 / (1 + z)`` for ``x >= 0`` and ``z / (1 + z)`` below, with
``z = exp(-|x|) in [0, 1]``, and ``sigmoid'(x) = sigmoid(x) sigmoid(-x) = z / (1 + z)^2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stablelayers._core import arithmetic, checks
from stablelayers._core.define_op import define_op
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.ops._softplus import softplus


def _primal(x: jax.Array) -> jax.Array:
    dtype = arithmetic.compute_dtype(x.dtype)
    z = jnp.exp(-jnp.abs(x.astype(dtype)))
    y = jnp.where(x >= 0, 1 / (1 + z), z / (1 + z))
    return y.astype(x.dtype)


def _sigmoid_slope(x: jax.Array) -> jax.Array:
    # sigmoid(x) * sigmoid(-x) = z / (1 + z)^2 with z = exp(-|x|): symmetric in x, so
    # exact at 0 (1/4) and exactly 0 at +-inf, never inf / inf.
    # Recomputed from x in registers: shared with the forward pass (the same expression,
    # under jit), z would be written to memory and read back by both.
    dtype = arithmetic.compute_dtype(x.dtype)
    z = jnp.exp(-jnp.abs(arithmetic.opaque_identity(x.astype(dtype))))
    return z / ((1 + z) * (1 + z))


def _fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Kept: x, from which the slope is exact (1 - y would lose it where y ~ 1).
    return _primal(x), x


def _bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    slope = _sigmoid_slope(x)
    return ((g.astype(slope.dtype) * slope).astype(x.dtype),)


def _jvp_rule(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (x,), (x_dot,) = primals, tangents
    slope = _sigmoid_slope(x)
    return _primal(x), (slope * x_dot.astype(slope.dtype)).astype(x.dtype)


sigmoid_op = define_op(_primal, fwd=_fwd, bwd=_bwd, jvp=_jvp_rule)


@allow_rank_promotion
def sigmoid(x: ArrayLike) -> jax.Array:
    r"""The logistic function ``1 / (1 + exp(-x))``, with an exact, NaN-free derivative.

    .. math::
        \sigma(x) = \begin{cases} 1 / (1 + z) & x \ge 0 \\ z / (1 + z) & x < 0
        \end{cases}, \quad z = e^{-|x|}, \qquad \sigma'(x) = \frac{z}{(1 + z)^2}

    ``sigmoid(+inf) = 1``, ``sigmoid(-inf) = 0``, both with derivative exactly 0;
    ``sigmoid'(0) = 1/4``. The backward pass keeps ``x``.

    Args:
        x: input of any shape (integers promoted; half precision computed in float32).

    Returns:
        An array of ``x``'s shape and dtype.
    """
    x = checks.as_float_array(x)
    return sigmoid_op(x)


@allow_rank_promotion
def log_sigmoid(x: ArrayLike) -> jax.Array:
    r"""``log(sigmoid(x)) = -softplus(-x)``, accurate over the whole float range.

    Through :func:`softplus`, so it keeps one array (its output) and its derivative
    ``sigmoid(-x)`` is exact: 0 at ``+inf``, 1 at ``-inf`` (where the value is ``-inf``).

    Args:
        x: input of any shape (integers promoted; half precision computed in float32).

    Returns:
        An array of ``x``'s shape and dtype.
    """
    x = checks.as_float_array(x)
    return -softplus(-x)
