"""The online softmax's log-sum-exp merge: a running maximum and rescaled sum per row.

A row's logits arrive in blocks. After each block the row holds its running maximum
``m`` and the sum ``l = sum_k exp(s_k - m)`` over the entries seen so far; a new block
``s`` moves them to

.. math::
    m' = \\max(m, \\max_k s_k), \\qquad \\alpha = e^{m - m'}, \\qquad
    l' = \\alpha\\, l + \\sum_k e^{s_k - m'},

and anything else summed with the weights ``e^{s_k - m}`` (attention's ``sum_k p_k v_k``)
is rescaled by ``alpha`` the same way. At the end ``logsumexp = m + log l``. (Milakov &
Gimelshein, "Online normalizer calculation for softmax", 2018; FlashAttention's forward.)

Masked entries are held at a *floor*, the lowest finite float of the compute dtype, and
never exponentiated: nothing here is infinite unless the input is, and a row with no
entry yet has ``m`` at the floor and ``l = 0``. Arrays are in the compute dtype; ``s``
has one more (trailing) axis than ``m`` and ``l``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stablelayers._core.nonfinite import is_neginf


class Step(NamedTuple):
    """One block's update: the new running maximum and sum, the block's weights
    ``p = exp(s - m')`` (0 at the floor) and ``alpha``, which rescales the old sums."""

    m: jax.Array
    l: jax.Array
    p: jax.Array
    alpha: jax.Array


def step(m: jax.Array, l: jax.Array, s: jax.Array, floor: ArrayLike) -> Step:
    """Merge the block of logits ``s`` (``(..., n)``, masked entries at ``floor``) into the
    running ``m`` and ``l`` (``(...)``)."""
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    shift = jnp.where(is_neginf(m_new), 0.0, m_new)
    p = jnp.where(s > floor, jnp.exp(s - shift[..., None]), 0.0)
    alpha = jnp.exp(m - shift)
    return Step(m_new, alpha * l + jnp.sum(p, axis=-1), p, alpha)


def start(lse: jax.Array, floor: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """``(m, l)`` that continue from a row's logsumexp (``floor`` for an empty row): the
    merge of two partial softmaxes is the second continued from the first."""
    return lse, jnp.where(lse == floor, 0.0, 1.0).astype(lse.dtype)


def finish(
    m: jax.Array,
    l: jax.Array,
    acc: jax.Array,
    floor: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
    """``(acc / l, m + log l)``: the normalised sum (``acc`` has one more trailing axis) and
    the row's logsumexp; an empty row (``l = 0``) gives 0 and ``floor``."""
    empty = l == 0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    return out, jnp.where(empty, floor, m + jnp.log(jnp.where(empty, 1.0, l)))
