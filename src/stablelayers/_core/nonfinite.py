"""Infinities and NaNs made only where they are the answer, never as constants.

``jax.debug_nans`` and ``jax.debug_infs`` check the output of every operation, and under
``jax.disable_jit()`` every intermediate: ``x == jnp.inf`` (the constant is staged as an
array), ``jnp.isinf`` and ``jnp.where(c, jnp.nan, y)`` all trip them on finite input. So
tests compare against the largest finite floats, and a non-finite value is computed from a
mask: ``log 0 = -inf`` and ``sqrt(-1) = NaN`` appear only in the places the mask selects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_posinf(x: jax.Array) -> jax.Array:
    """``x == +inf`` without an inf constant (NaN gives False)."""
    return x > jnp.finfo(x.dtype).max


def is_neginf(x: jax.Array) -> jax.Array:
    """``x == -inf`` without an inf constant (NaN gives False)."""
    return x < jnp.finfo(x.dtype).min


def neg_inf_where(mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``-inf`` where ``mask``, 0 elsewhere."""
    return jnp.log(jnp.where(mask, 0.0, 1.0).astype(dtype))


def pos_inf_where(mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``+inf`` where ``mask``, 0 elsewhere."""
    return -neg_inf_where(mask, dtype)


def nan_where(mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """NaN where ``mask``, 0 elsewhere."""
    return jnp.sqrt(jnp.where(mask, -1.0, 0.0).astype(dtype))
