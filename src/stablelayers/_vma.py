"""Loop carries that start as constants, made as device-varying as the data they meet.

Inside ``jax.shard_map`` (with its default ``check_vma=True``) every value is typed by the
mesh axes along which it varies, and a loop's carry must keep its type: a carry that
starts as ``jnp.zeros`` (the same on every device) and takes in a block of a sharded input
would change type, which JAX rejects. ``match`` casts the start to the axes of the inputs
(``lax.pcast(..., to="varying")``, a no-op at run time); outside ``shard_map`` it does
nothing.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
from jax import lax

T = TypeVar("T")


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

    def cast(x: Any) -> Any:
        missing = tuple(sorted(wanted - _axes(x), key=str))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def sum_to(x: jax.Array, like: Any) -> jax.Array:
    """``x`` summed over the mesh axes it varies along and ``like`` does not: the gradient
    of an input that every device shares is the sum of the devices' shares."""
    extra = tuple(sorted(_axes(x) - _axes(like), key=str))
    return lax.psum(x, extra) if extra else x
