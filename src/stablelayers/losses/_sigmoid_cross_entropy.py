r"""The sigmoid binary cross-entropy on logits, finite wherever the math is.

Written on :func:`softplus` (``-log sigmoid(x) = softplus(-x)``), each term weighted by its
target through ``_target_weight`` so that a zero weight times an infinite cost is 0 while
the derivative in the target stays the cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stablelayers._core import checks
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.losses import _target_weight
from stablelayers.losses._cross_entropy import Reduction, check_reduction, reduce_loss
from stablelayers.ops._softplus import softplus


@allow_rank_promotion
def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    where: ArrayLike | None = None,
    *,
    reduction: Reduction = "none",
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
        reduction: ``'none'`` (the loss per entry, the default), ``'mean'`` (over the
            entries ``where`` keeps; 0, with gradient 0, when it keeps none) or ``'sum'``,
            as the other losses'. There is no ``axis``: the loss is elementwise.

    Returns:
        The per-entry loss, of the broadcast shape, or a scalar; in ``logits``' dtype.

    Raises:
        TypeError: ``where`` is not boolean.
        ValueError: ``labels`` or ``where`` does not broadcast to ``logits``, an unknown
            ``reduction``.
    """
    check_reduction(reduction)
    x = checks.as_float_array(logits, "logits")
    t = jnp.asarray(labels)
    if not checks.broadcasts_to(t.shape, x.shape):
        raise ValueError(
            f"`labels` of shape {t.shape} does not broadcast to the logits' shape {x.shape}."
        )
    t = checks.as_float_array(t, "labels").astype(x.dtype)
    where_ = checks.check_where(where, x.shape)
    t = jnp.broadcast_to(t, x.shape)
    if where_ is not None:
        x = jnp.where(where_, x, 0.0)
    # Each term 0 where its weight is 0 (no 0 * inf at an infinite logit), and its
    # derivative in t the cost there too (_target_weight): d loss / d t = -x.
    positive = _target_weight.target_weight(t, softplus(-x))
    negative = _target_weight.target_weight(1 - t, softplus(x))
    loss = positive + negative
    if where_ is None:
        return reduce_loss(loss, jnp.ones(loss.shape, bool), reduction)
    return reduce_loss(
        jnp.where(where_, loss, 0.0), jnp.broadcast_to(where_, x.shape), reduction
    )
