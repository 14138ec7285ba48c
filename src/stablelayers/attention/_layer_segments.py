"""Segment ids handed from an attention layer to :func:`dot_product_attention`.

Flax's attention layers call their ``attention_fn`` with Flax's own keywords only, so
the ids a caller gives ``MultiHeadAttention(x, segment_ids=ids)`` cannot travel as an
argument. The layer sets them here for the length of its call; ``dot_product_attention`` or
``ring_attention_sharded``, called by the layer's ``attention_fn`` (plain, a partial, or
a module), takes them,
and the layer raises if nothing did, so that no ``attention_fn`` drops them silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from jax.typing import ArrayLike


@dataclass
class Handover:
    """The ids of one layer call, by ``dot_product_attention``'s keyword names, and
    whether an attention call took them."""

    ids: dict[str, ArrayLike]
    taken: bool = field(default=False)


_PENDING: ContextVar[Handover | None] = ContextVar("stablelayers_segment_ids", default=None)


@contextmanager
def handing_over(ids: dict[str, ArrayLike]) -> Iterator[Handover]:
    """Make ``ids`` the segment ids of every ``dot_product_attention`` call inside."""
    handover = Handover(ids)
    token = _PENDING.set(handover)
    try:
        yield handover
    finally:
        _PENDING.reset(token)


def take() -> dict[str, ArrayLike]:
    """The segment ids a layer handed over (marked as taken), or ``{}``."""
    handover = _PENDING.get()
    if handover is None:
        return {}
    handover.taken = True
    return handover.ids


def not_taken_error(layer: str) -> ValueError:
    return ValueError(
        f"{layer} was given segment ids, but its `attention_fn` never called "
        "stablelayers.dot_product_attention, so nothing applied them. Use an "
        "`attention_fn` that calls it (the default, DotProductAttention, or a "
        "functools.partial of dot_product_attention), or pass the ids to your function."
    )
