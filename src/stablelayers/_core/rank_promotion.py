"""Implicit rank promotion inside stablelayers' own code.

JAX's and Equinox's test suites run with ``jax_numpy_rank_promotion="raise"``, which turns
every implicit broadcast of a lower-rank array into an error, so that a user's accidental
broadcast fails loudly. The broadcasts inside stablelayers are deliberate (per-row values
against rows, a ``(q_len, kv_len)`` bias against ``(batch, heads, q_len, kv_len)`` logits,
the documented broadcasting of ``where``, ``sink`` and ``beta``), and must work whatever the
user's setting, as ``jax.nn``'s do. Every public function and every derivative rule, which
JAX may trace long after the public call returned, runs its body under ``"allow"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import jax

P = ParamSpec("P")
R = TypeVar("R")


def allow_rank_promotion(f: Callable[P, R]) -> Callable[P, R]:
    """``f`` traced with implicit rank promotion allowed, whatever the global setting."""

    @functools.wraps(f)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        with jax.numpy_rank_promotion("allow"):
            return f(*args, **kwargs)

    return wrapped
