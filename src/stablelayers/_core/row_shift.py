"""The row shift every softmax-family op starts from, and the rules for what it leaves out.

Subtracting the row max changes neither value nor gradient (it is under stop_gradient)
and keeps ``exp`` from overflowing. Masked entries are held as the lowest finite float
rather than ``-inf``, so nothing here is infinite unless the input is (``jax.debug_infs``
checks every intermediate in eager mode). Shapes: ``x`` of any shape, ``where`` a boolean
array that broadcasts to it or ``None``, ``axis`` a sorted tuple of non-negative ints, and
per-row values in the keepdims shape of a reduction over ``axis``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.arithmetic import two_sum_error
from stablelayers._core.checks import Axes
from stablelayers._core.nonfinite import is_neginf, is_posinf


def row_max(
    x: jax.Array, where: jax.Array | None, sink: jax.Array | None, axis: Axes
) -> jax.Array:
    """The row max over unmasked entries (and the sink), under stop_gradient. A row with
    nothing unmasked gets the lowest finite float, and no entry of it has mass."""
    if where is not None:
        x = jnp.where(where, x, jnp.finfo(x.dtype).min)
    top = jnp.max(x, axis=axis, keepdims=True)
    if sink is not None:
        top = jnp.maximum(top, sink)
    return lax.stop_gradient(top)


def shift_of_row_max(top: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(shift, has_posinf)``: the row max, or 0 where it is not finite, and whether it
    is ``+inf``."""
    return jnp.where(jnp.isfinite(top), top, 0.0), is_posinf(top)


def shift(
    x: jax.Array, where: jax.Array | None, amount: jax.Array, has_posinf: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(d, err, dead)`` with ``x - amount = d + err`` exactly at live entries.

    ``dead`` marks the entries without mass: masked ones, and in a row holding ``+inf``
    every finite or ``-inf`` entry (the row is replaced by its limit: its ``+inf`` entries
    share the mass equally). A dead entry gets the lowest finite ``d``, whose exp is 0,
    rather than ``-inf``; whatever it held (a masked NaN included) is gone. An unmasked NaN
    is never dead and its ``d`` is NaN, so any sum of the row's ``exp(d)`` is NaN: that is
    how the ops find NaN rows without a pass of their own.
    """
    nan = jnp.isnan(x)
    dead = has_posinf & ~is_posinf(x) & ~nan
    if where is not None:
        dead = dead | ~where
        nan = nan & where
    x = jnp.where(dead | (has_posinf & ~nan), 0.0, x)
    raw = x - amount
    # x - amount is the one rounding that exp amplifies (an absolute error e in the exponent
    # is a relative error e in the result, up to 50 ULP for logits of size 1e4), so it is
    # carried to the end.
    err = two_sum_error(x, -amount, raw)
    # A finite logit stays finite after the shift (x - amount may overflow for logits near
    # the float limits), so it keeps its log-probability gradient; a -inf logit has none.
    lowest = jnp.finfo(x.dtype).min
    d = jnp.where(is_neginf(x) | nan, x, jnp.maximum(raw, lowest))
    return jnp.where(dead, lowest, d), err, dead


def shifted_logits(
    x: jax.Array,
    where: jax.Array | None,
    sink: jax.Array | None,
    axis: Axes,
    top_shift: jax.Array | None = None,
    has_posinf: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """``(d, err, d_sink, err_sink)`` with ``x - shift = d + err`` exactly, the shift being
    the row max over unmasked entries and the sink (see ``shift``), or ``top_shift`` and
    ``has_posinf`` where the caller has them from ``shift_of_row_max`` already."""
    if top_shift is None or has_posinf is None:
        top_shift, has_posinf = shift_of_row_max(row_max(x, where, sink, axis))
    d, err, _ = shift(x, where, top_shift, has_posinf)
    if sink is None:
        return d, err, None, None
    sink_dead = has_posinf & ~is_posinf(sink)
    sink = jnp.where(has_posinf, 0.0, sink)
    d_sink = sink - top_shift
    err_sink = two_sum_error(sink, -top_shift, d_sink)
    return d, err, jnp.where(sink_dead, jnp.finfo(d.dtype).min, d_sink), err_sink


def nan_rows(x: jax.Array, where: jax.Array | None, axis: Axes) -> jax.Array:
    """Whether each row holds a NaN in an unmasked place. Such a row is NaN at every
    unmasked entry but its ``-inf`` ones, on both CPU paths and whatever the row length
    (XLA's max may drop a NaN, so the rule is applied, not left to the arithmetic)."""
    nan = jnp.isnan(x)
    if where is not None:
        nan = nan & where
    return jnp.any(nan, axis=axis, keepdims=True)


def exempt_from_nan(x: jax.Array, where: jax.Array | None) -> jax.Array:
    """The entries a NaN row leaves alone: masked ones and ``-inf`` logits."""
    exempt = is_neginf(x)
    return exempt if where is None else exempt | ~where
