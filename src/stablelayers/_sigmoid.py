r"""sigmoid, log_sigmoid and the sigmoid binary cross-entropy, exact at 0 and at +-inf.

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

from stablelayers import _checks, _float_arithmetic, _target_weight
from stablelayers._rank_promotion import allow_rank_promotion
from stablelayers._softplus import softplus
from stablelayers._switches import forward_mode_enabled


def _sigmoid_primal(x: jax.Array) -> jax.Array:
    dtype = _float_arithmetic.compute_dtype(x.dtype)
    x = x.astype(dtype)
    z = jnp.exp(-jnp.abs(x))
    return jnp.where(x >= 0, 1 / (1 + z), z / (1 + z))


def _sigmoid_slope(x: jax.Array) -> jax.Array:
    # sigmoid(x) * sigmoid(-x) = z / (1 + z)^2 with z = exp(-|x|): symmetric in x, so
    # exact at 0 (1/4) and exactly 0 at +-inf, never inf / inf.
    dtype = _float_arithmetic.compute_dtype(x.dtype)
    z = jnp.exp(-jnp.abs(x.astype(dtype)))
    return z / ((1 + z) * (1 + z))


@jax.custom_vjp
def _sigmoid_vjp_op(x: jax.Array) -> jax.Array:
    return _sigmoid_primal(x).astype(x.dtype)


@allow_rank_promotion
def _sigmoid_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Kept: x, from which the slope is exact (1 - y would lose it where y ~ 1).
    return _sigmoid_primal(x).astype(x.dtype), x


@allow_rank_promotion
def _sigmoid_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    slope = _sigmoid_slope(x)
    return ((g.astype(slope.dtype) * slope).astype(x.dtype),)


_sigmoid_vjp_op.defvjp(_sigmoid_fwd, _sigmoid_bwd)


@jax.custom_jvp
def _sigmoid_jvp_op(x: jax.Array) -> jax.Array:
    return _sigmoid_primal(x).astype(x.dtype)


@_sigmoid_jvp_op.defjvp
@allow_rank_promotion
def _sigmoid_jvp_rule(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (x,), (x_dot,) = primals, tangents
    slope = _sigmoid_slope(x)
    return _sigmoid_primal(x).astype(x.dtype), (slope * x_dot.astype(slope.dtype)).astype(
        x.dtype
    )


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
    x = _checks.as_float_array(x)
    return (_sigmoid_jvp_op if forward_mode_enabled() else _sigmoid_vjp_op)(x)


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
    x = _checks.as_float_array(x)
    return -softplus(-x)


@allow_rank_promotion
def sigmoid_binary_cross_entropy(
    logits: ArrayLike, labels: ArrayLike, where: ArrayLike | None = None
) -> jax.Array:
    r"""Elementwise binary cross-entropy on logits, finite wherever the math is.

    .. math::
        \ell(x, t) = t\,\mathrm{softplus}(-x) + (1 - t)\,\mathrm{softplus}(x),
        \qquad \frac{\partial \ell}{\partial x} = \sigma(x) - t

    Each term is taken only where its weight is non-zero, so ``x = +inf`` with ``t = 1``
    (or ``-inf`` with ``t = 0``) gives loss 0 and gradient 0, not ``inf - inf``
    (jax #2107, pytorch #135359). The same loss as ``optax.sigmoid_binary_cross_entropy``.

    Args:
        logits: logits of any shape.
        labels: targets in ``[0, 1]`` (soft labels allowed), broadcastable to ``logits``;
            booleans and integers are accepted.
        where: optional boolean mask broadcastable to ``logits``; ``False`` entries give
            loss 0 and gradient 0 whatever the logit (NaN and inf included).

    Returns:
        The per-entry loss, of the broadcast shape and ``logits``' dtype. Reduce it
        yourself, e.g. with :func:`mean_over_valid`.

    Raises:
        TypeError: ``where`` is not boolean.
        ValueError: ``labels`` or ``where`` does not broadcast to ``logits``.
    """
    x = _checks.as_float_array(logits, "logits")
    t = jnp.asarray(labels)
    if not _checks.broadcasts_to(t.shape, x.shape):
        raise ValueError(
            f"`labels` of shape {t.shape} does not broadcast to the logits' shape {x.shape}."
        )
    t = _checks.as_float_array(t, "labels").astype(x.dtype)
    where_ = _checks.check_where(where, x.shape)
    t = jnp.broadcast_to(t, x.shape)
    if where_ is not None:
        x = jnp.where(where_, x, 0.0)
    # Each term 0 where its weight is 0 (no 0 * inf at an infinite logit), and its
    # derivative in t the cost there too (_target_weight): d loss / d t = -x.
    positive = _target_weight.target_weight(t, softplus(-x))
    negative = _target_weight.target_weight(1 - t, softplus(x))
    loss = positive + negative
    return loss if where_ is None else jnp.where(where_, loss, 0.0)
