"""Loop carries that start as constants, made as device-varying as the data they meet.

Inside ``jax.shard_map`` (with its default ``check_vma=True``) every value is typed by the
mesh axes along which it varies, and a loop's carry must keep its type: a carry that
starts as ``jnp.zeros`` (the same on every device) and takes in a block of a sharded input
would change type, which JAX rejects. ``match`` casts the start to the axes of the inputs
(``lax.pcast(..., to="varying")``, a no-op at run time); outside ``shard_map`` it does
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax
from jax import lax

T = TypeVar("T")

# lax's collectives are untyped; these are their signatures as used here.
_psum = cast(Callable[[jax.Array, tuple[Any, ...]], jax.Array], lax.psum)
_ppermute = cast(Callable[[jax.Array, str, list[tuple[int, int]]], jax.Array], lax.ppermute)


def _axes(x: Any) -> frozenset[Any]:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; `vma` before
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def match(tree: T, *refs: Any) -> T:
    """``tree`` with each array varying along every mesh axis some leaf of ``refs`` does."""
    wanted = frozenset().union(*(_axes(r) for r in jax.tree.leaves(refs)))
    if not wanted:
        return tree

    def to_varying(x: Any) -> Any:
        missing = tuple(sorted(wanted - _axes(x), key=str))
        return lax.pcast(x, missing, to="varying") if missing else x

    return cast(T, jax.tree.map(to_varying, tree))


def sum_over_devices(x: jax.Array, like: Any) -> jax.Array:
    """``x`` summed over the mesh axes it varies along and ``like`` does not: the gradient
    of an input that every device shares is the sum of the devices' shares."""
    extra = tuple(sorted(_axes(x) - _axes(like), key=str))
    return _psum(x, extra) if extra else x


def ppermute(x: jax.Array, axis_name: str, perm: list[tuple[int, int]]) -> jax.Array:
    """``lax.ppermute``: ``x`` sent from device ``i`` to ``j`` for each ``(i, j)`` in
    ``perm``; a device that receives nothing gets zeros."""
    return _ppermute(x, axis_name, perm)
