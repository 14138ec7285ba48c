r"""The vocabulary split over a mesh axis: how the devices' shares of the fused loss
combine (Megatron-LM's vocab-parallel cross-entropy, Shoeybi et al., 2019, section 3).

Device ``d`` of ``n`` holds the weight columns ``[d V_l, (d + 1) V_l)`` of a vocabulary
of ``V = n V_l`` and walks only those (the blocked per-token loss); per token it keeps its
running max ``m_d``, its sum ``s_d = sum e^{l - m_d}``, its share of the label's logit
(the label's logit if the label is one of its columns, else 0) and of the sum of the
logits. The shares combine exactly, in the numerically safe order of the online
log-sum-exp (Milakov & Gimelshein, 2018):

.. math::
    m = \max_d m_d, \qquad s = \sum_d s_d\, e^{m_d - m}, \qquad \mathrm{lse} = m + \log s,
    \qquad t = \sum_d t_d, \qquad S = \sum_d S_d

(``pmax`` then ``psum``: every term is at most ``s_d``). Four numbers per token cross the
axis; no weight column and no logit does. The backward pass recomputes each block's
logits on its own device with the global ``lse``, so ``dW`` and ``db`` stay on their
shard and ``dh`` is summed over the axis once.

Outside ``shard_map`` (``axis_name=None``) every helper here is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers.attention import _sharding
from stablelayers.losses import _fused_terms as terms

T = TypeVar("T")

# lax's collectives are untyped; these are their signatures as used here.
_psum = cast(Callable[[jax.Array, str], jax.Array], lax.psum)
_pmax = cast(Callable[[jax.Array, str], jax.Array], lax.pmax)


def match(tree: T, *refs: Any) -> T:
    """A loop carry that starts as constants, made as device-varying as ``refs``
    (:func:`stablelayers.attention._sharding.match`; a no-op outside shard_map)."""
    return _sharding.match(tree, *refs)


def like(x: jax.Array | None, primal: Any) -> Any:
    """A cotangent summed over the mesh axes it varies along and ``primal`` does not
    (``None`` stays ``None``)."""
    if x is None or primal is None:
        return x
    return _sharding.sum_over_devices(x, primal)


def loss_cotangent(
    g: jax.Array, weight: jax.Array, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
    """The cotangent of the combined loss as the backward pass needs it on each device:
    ``(for the column shares: dh, dW, db, the cap's; for the whole: eps, z)``.

    With ``shard_map``'s ``check_vma=True`` the loss is typed as the same on every device
    of the axis and ``g`` is its cotangent, for both. With ``check_vma=False`` nothing is
    typed (``weight``, split over the axis, then varies along no axis): JAX hands each
    device a share of the cotangent and sums each input's cotangent over the devices
    that share it. A column share then needs the whole ``g`` (summed here, as the
    transpose of the ``psum`` that formed the loss would); a derivative every device
    holds whole (in eps, z) takes the share, so that the devices' shares sum to it."""
    if axis_name is None or _sharding._axes(weight):
        return g, g
    return _psum(g, axis_name), g


def psum(x: jax.Array, axis_name: str) -> jax.Array:
    """``lax.psum`` over one axis."""
    return _psum(x, axis_name)


def combine(
    m: jax.Array, s: jax.Array, target: jax.Array, total: jax.Array, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The whole vocabulary's ``(max, sum e^{l - max}, label logit, sum of logits)`` per
    token from each shard's (the module's formula); as they are with no axis."""
    if axis_name is None:
        return m, s, target, total
    # The max is a shift that cancels; the rules are written by hand (no autodiff here).
    top = _pmax(m, axis_name)
    s = _psum(s * jnp.exp(m - top), axis_name)
    return top, s, _psum(target, axis_name), _psum(total, axis_name)


class Shard(NamedTuple):
    """This device's place on the vocabulary axis."""

    axis_name: str
    devices: int  # along the axis
    local: int  # columns per device, V_l
    offset: jax.Array  # () int: this device's first column, d V_l

    @property
    def vocab(self) -> int:
        """``V``, the whole vocabulary."""
        return self.devices * self.local


def shard(axis_name: str, local: int, name: str) -> Shard:
    """``axis_name``'s size and this device's offset; a clear error outside shard_map."""
    try:
        count = lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{name}(axis_name={axis_name!r}) needs that mesh axis bound: call it inside "
            "jax.shard_map with the weight's columns split over the axis, or use "
            "stablelayers.linear_softmax_cross_entropy_sharded, which does the shard_map "
            "for you."
        ) from None
    offset = lax.axis_index(axis_name) * local
    return Shard(axis_name, int(count), local, offset)


def label_masked(mask: jax.Array, labels: jax.Array, where: Shard | None) -> jax.Array:
    """Per token: the label's class is masked out by ``mask`` (the local ``(V_l,)``
    columns under a shard). An out-of-range label reads False (it is poisoned anyway),
    as on one device."""
    if where is None:
        return ~mask.at[labels].get(mode="fill", fill_value=True)
    # Only the shard that holds the label can say; the others say False (no negative
    # index may wrap round to this shard's last columns).
    local = labels - where.offset
    inside = (local >= 0) & (local < where.local)
    masked = inside & ~mask[jnp.clip(local, 0, where.local - 1)]
    return _psum(masked.astype(jnp.int32), where.axis_name) > 0


def any_class(mask: jax.Array, where: Shard | None) -> jax.Array:
    """Whether some class of the whole vocabulary is unmasked."""
    if where is None:
        return jnp.any(mask)
    return _psum(jnp.any(mask).astype(jnp.int32), where.axis_name) > 0


def live_classes(inputs: terms.Inputs, axis_name: str | None) -> jax.Array:
    """``K``, the live classes of the whole vocabulary (over every shard), at least 1."""
    if axis_name is None:
        return terms.class_count(inputs)
    live = _psum(jnp.sum(inputs.vocab_mask), axis_name)
    return jnp.maximum(live, 1).astype(terms.acc_dtype(inputs.hidden))
