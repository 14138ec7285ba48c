"""Inputs shared by several test modules: attention operands, and rows holding NaN and
infinities in every arrangement the NaN rule (docs/semantics.md) distinguishes."""

import jax
import numpy as np


def attention_inputs(b=2, t=8, s=8, n=2, h=4):
    """query (b, t, n, h), key and value (b, s, n, h), standard normal."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, s, n, h))
    v = jax.random.normal(keys[2], (b, s, n, h))
    return q, k, v


def nan_rows(n):
    """Four float32 rows of length n: a NaN alone, a NaN beside +inf, a NaN beside -inf, a
    NaN in a row whose exponentials underflow."""
    rng = np.random.default_rng(n)
    rows = rng.normal(size=(4, n)).astype(np.float32) * 50
    rows[0, n // 2] = np.nan
    rows[1, 0], rows[1, n - 1] = np.inf, np.nan
    rows[2, 1 % n], rows[2, 0] = -np.inf, np.nan
    rows[3, :] = -200.0
    rows[3, n - 1] = np.nan
    return rows
