r"""softmax_cross_entropy on the logsumexp op, and the mean over the examples that count.

.. math::
    \ell = -\sum_j q_j \log p_j + z\,\mathrm{lse}(x)^2, \qquad
    \frac{\partial \ell}{\partial x_j} = (\textstyle\sum_k q_k + 2 z\,\mathrm{lse})\,p_j - q_j,
    \qquad \frac{\partial \ell}{\partial q_j} = -\log p_j

with ``p = softmax(x)`` over the unmasked classes and ``q`` the target distribution: the
one-hot of an integer label, or given probabilities, smoothed as
``q = (1 - eps) q + eps / K`` over the ``K`` unmasked classes only (no mass leaks to a
masked class, optax PR #1760). ``z`` is PaLM's auxiliary z-loss (Chowdhery et al., 2022).
The log-sum-exp's backward pass keeps the logits (one array) and two numbers per row; the
target term keeps the integer labels or the given probabilities. Integer and one-hot labels
go through the same arithmetic and give the same gradient (optax #1335).
"""

from __future__ import annotations

import operator
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.typing import ArrayLike

from stablelayers._core import checks
from stablelayers._core.arithmetic import compute_dtype
from stablelayers._core.nonfinite import nan_where
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers.losses import _target_weight
from stablelayers.losses._soft_cap import soft_cap
from stablelayers.ops._logsumexp import lse_rows

HyperParameter = float | jax.Array
Reduction = Literal["none", "mean", "sum"]


def _hyper_parameter(value: ArrayLike, name: str) -> tuple[float | None, HyperParameter]:
    """``(concrete value or None, value to compute with)``: a traced scalar (jitted, or
    from a schedule) is taken as it is, since its value is not known until run time."""
    number = checks.concrete_number(value, name)
    if number is not None:
        return number, number
    traced = jnp.asarray(value)
    real = jnp.issubdtype(traced.dtype, jnp.floating) or jnp.issubdtype(
        traced.dtype, jnp.integer
    )
    if traced.shape != () or not real:
        raise TypeError(
            f"`{name}` must be a real scalar, got a traced array of shape {traced.shape} "
            f"and dtype {traced.dtype}."
        )
    return None, traced


def check_loss_options(
    label_smoothing: ArrayLike, z_loss: ArrayLike, ignore_index: int | None
) -> tuple[HyperParameter, HyperParameter]:
    """The scalar options shared by both cross-entropies, checked at trace time when they
    are concrete; returned as floats, or as the traced scalars they are."""
    eps, eps_value = _hyper_parameter(label_smoothing, "label_smoothing")
    if eps is not None and not 0.0 <= eps < 1.0:
        raise ValueError(
            f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}: it is the mass "
            "moved from the label to the uniform distribution (0.1 is usual)."
        )
    z, z_value = _hyper_parameter(z_loss, "z_loss")
    if z is not None and not (z >= 0.0 and z < float("inf")):
        raise ValueError(f"`z_loss` must be a finite number >= 0, got {z_loss!r}.")
    if ignore_index is not None:
        try:
            operator.index(ignore_index)
        except TypeError:
            raise TypeError(f"`ignore_index` must be an int, got {ignore_index!r}.") from None
    return eps_value, z_value


def check_soft_cap(logits_soft_cap: ArrayLike | None) -> HyperParameter | None:
    """The logit soft-cap ``c`` of both cross-entropies: ``None`` (off), a positive finite
    float when concrete (checked at trace time), or the traced scalar it is."""
    if logits_soft_cap is None:
        return None
    cap, value = _hyper_parameter(logits_soft_cap, "logits_soft_cap")
    if cap is not None and not 0.0 < cap < float("inf"):
        raise ValueError(
            f"`logits_soft_cap` must be a finite number > 0 or None, got "
            f"{logits_soft_cap!r}: the logits are mapped to cap * tanh(logits / cap) "
            "(30.0 in Gemma 2)."
        )
    return value


def is_off(value: HyperParameter) -> bool:
    """Whether an option is a concrete 0, so its term can be left out of the graph."""
    return isinstance(value, float) and value == 0.0


def out_of_range(labels: jax.Array, classes: int, counted: jax.Array, name: str) -> jax.Array:
    """Counted labels outside ``[0, classes)``: their loss is made NaN (never a finite
    number), and under ``jax.experimental.checkify`` they raise."""
    bad = counted & ((labels < 0) | (labels >= classes))
    checkify.debug_check(
        ~jnp.any(bad),
        f"{name}: a label is outside [0, {classes}) and is not `ignore_index`; set "
        "`ignore_index` for padding labels such as -100.",
    )
    return bad


def poison(loss: jax.Array, bad: jax.Array) -> jax.Array:
    """``loss`` with NaN where ``bad``: multiplied, so its gradient there is NaN too
    (no finite garbage), and exact elsewhere (``loss * (1 + 0)``)."""
    return loss * (1.0 + nan_where(bad, loss.dtype))


def check_reduction(reduction: str) -> None:
    """``reduction`` is one of the losses' three: ``'none'``, ``'mean'``, ``'sum'``."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"`reduction` must be 'none', 'mean' or 'sum', got {reduction!r}.")


def mean_where(loss: jax.Array, where: jax.Array) -> jax.Array:
    """The mean of ``loss`` over ``where`` (both of one shape); 0, with gradient 0, where
    no entry counts."""
    total = jnp.sum(jnp.where(where, loss, 0.0))
    return total / jnp.maximum(jnp.sum(where), 1).astype(loss.dtype)


def reduce_loss(loss: jax.Array, counted: jax.Array, reduction: Reduction) -> jax.Array:
    """``loss`` (0 where not ``counted``) as it is, its mean over ``counted``, or its sum."""
    if reduction == "mean":
        return mean_where(loss, counted)
    if reduction == "sum":
        return jnp.sum(loss)
    return loss


def check_integer_labels(labels: ArrayLike, rows: tuple[int, ...]) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"integer `labels` must have an integer dtype, got {labels.dtype}.")
    if labels.shape != rows:
        raise ValueError(
            f"integer `labels` must have the logits' shape without the class axis, {rows}, "
            f"got {labels.shape}; for probabilities pass a float array of the logits' shape."
        )
    return labels


def _class_axes(axis: checks.Axis, ndim: int) -> checks.Axes:
    """The class axes, non-negative, in the order given (a flat integer label indexes
    them in that order, as optax's); ``axis`` is taken as the ops take it."""
    checked = checks.check_axis(axis)
    checks.canonical_axis(checked, ndim)
    if checked is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in ((checked,) if isinstance(checked, int) else checked))


def example_where(
    where: ArrayLike | None, shape: tuple[int, ...], axes: tuple[int, ...]
) -> jax.Array | None:
    """``where`` broadcast to the logits' ``shape``. A mask of the examples' rank that
    broadcasts to their shape (the logits' without ``axes``) masks whole examples, as
    optax's ``where`` of shape ``(batch,)``; any other broadcasts to the logits."""
    if where is None:
        return None
    where_ = jnp.asarray(where)
    rows = tuple(n for i, n in enumerate(shape) if i not in axes)
    if where_.ndim == len(rows) < len(shape) and checks.broadcasts_to(where_.shape, rows):
        where_ = jnp.expand_dims(where_, tuple(sorted(axes)))
    checked = checks.check_where(where_, shape)
    assert checked is not None
    return jnp.broadcast_to(checked, shape)


@allow_rank_promotion
def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: checks.Axis = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    ignore_index: int | None = None,
    reduction: Reduction = "none",
    logits_soft_cap: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy per example (or its mean or sum), for integer or probability
    labels; ``axis`` and ``where`` in optax's places.

    .. math::
        \ell = -\sum_j q_j \log p_j + z\,\mathrm{lse}(x)^2,
        \qquad \log p_j = x_j - \mathrm{lse}(x)

    with ``lse`` the accurate :func:`logsumexp` and ``q`` the (smoothed) target
    distribution (optax's definition); the gradient is ``(1 + 2 z lse) softmax(x) - q``
    per example for labels that sum to 1, and ``-log p_j`` with respect to ``q_j``, for
    every class (``q_j = 0`` included: ``+inf`` where a ``-inf`` logit makes ``p_j = 0``).

    Args:
        logits: logits of shape ``(..., classes, ...)`` (``axis`` names the class axes).
        labels: integer class indices of the logits' shape without ``axis`` (any integer
            dtype, int64 under x64 included), or float probabilities of the logits' shape
            (one-hot or soft; rows should sum to 1). With several class axes an integer
            label is a flat index into them, in the order ``axis`` lists them (as
            ``jnp.ravel_multi_index`` makes it, and as optax reads it).
        axis: the class axis, a tuple of them, or ``None`` for all.
        where: optional boolean mask. Of the examples' shape (the logits' without
            ``axis``, e.g. ``(batch,)``): ``False`` examples give loss 0 and gradient 0,
            as optax's ``where``. Otherwise broadcastable to ``logits``: ``False``
            classes are left out of the softmax and of the smoothing; a row with no class
            left gives loss 0 and gradient 0.
        label_smoothing: ``eps`` in ``[0, 1)``: the target becomes
            ``(1 - eps) q + eps / K`` over the ``K`` unmasked classes. A concrete value is
            checked; a traced one (under ``jit``, or from a schedule) is taken as it is,
            and the loss is differentiable in it.
        z_loss: coefficient ``>= 0`` of PaLM's ``lse^2`` term (1e-4 in PaLM); checked
            when concrete, taken as it is when traced, as ``label_smoothing``.
        ignore_index: integer labels equal to it give loss 0 and gradient 0, whatever their
            logits hold (NaN and inf included).
        reduction: ``'none'`` (the loss per example, the default), ``'mean'`` (over the
            examples that count: not ignored, not masked, with a class left; 0, with
            gradient 0, when none does) or ``'sum'``, as
            :func:`linear_softmax_cross_entropy`'s.
        logits_soft_cap: ``c > 0``, or ``None`` (the default: no op is added). The loss
            is that of the capped logits ``c tanh(x / c)`` (Gemma 2's final-logit
            soft-capping, arXiv:2408.00118, section 2, ``c = 30``; Liger-Kernel's
            ``softcap``): ``where``, ``ignore_index``, the smoothing, the z-loss and the
            reduction apply to them, and the gradient is the chain rule's,
            ``(1 - tanh^2(x / c))`` times the capped logits' gradient. A ``-inf`` logit
            becomes ``-c``, so with a cap it keeps some probability (mask classes with
            ``where``). Checked when concrete (a positive finite number); a traced one is
            taken as it is, and the loss is differentiable in it,
            ``d(c tanh u)/dc = tanh u - u (1 - tanh^2 u)`` at ``u = x / c``.

    Returns:
        The loss per example, of the logits' shape without ``axis``, or a scalar; in the
        logits' dtype.
        A ``-inf`` logit off the target gives a finite loss and gradient 0 there; a ``-inf``
        logit on the target gives ``+inf``, as the math says. An integer label outside
        ``[0, classes)`` that is not ``ignore_index`` gives NaN, with NaN gradient, for
        its example, never a number (PyTorch raises, optax returns the log-sum-exp as if
        the target were absent); under ``jax.experimental.checkify.checkify`` it raises.

    Raises:
        TypeError: labels of the wrong dtype, non-boolean ``where``, bad ``axis``.
        ValueError: labels of the wrong shape, ``axis`` out of range, ``label_smoothing``
            outside ``[0, 1)``, negative ``z_loss``, a ``logits_soft_cap`` that is not
            positive and finite, an unknown ``reduction``.
    """
    check_reduction(reduction)
    x = checks.as_float_array(logits, "logits")
    axes = _class_axes(axis, x.ndim)
    eps, z = check_loss_options(label_smoothing, z_loss, ignore_index)
    cap = check_soft_cap(logits_soft_cap)
    where_ = example_where(where, x.shape, axes)
    batch_axes = tuple(i for i in range(x.ndim) if i not in axes)
    rows = tuple(x.shape[i] for i in batch_axes)
    labels_ = jnp.asarray(labels)
    integer = jnp.issubdtype(labels_.dtype, jnp.integer)
    if integer:
        labels_ = check_integer_labels(labels_, rows)
    elif not jnp.issubdtype(labels_.dtype, jnp.floating):
        raise TypeError(f"`labels` must be integer or float, got dtype {labels_.dtype}.")
    elif labels_.shape != x.shape:
        raise ValueError(
            f"probability `labels` must have the logits' shape {x.shape}, got "
            f"{labels_.shape}; for class indices pass an integer array of shape {rows}."
        )
    if len(axes) == 1:
        axis_ = axes[0]
    else:
        # Several class axes are one: moved last in the order given and flattened.
        def flat(a: jax.Array) -> jax.Array:
            return jnp.transpose(a, batch_axes + axes).reshape((*rows, -1))

        x, axis_ = flat(x), len(rows)
        where_ = None if where_ is None else flat(where_)
        labels_ = labels_ if integer else flat(labels_)
    classes = x.shape[axis_]
    live = jnp.ones(x.shape, bool) if where_ is None else where_
    valid_row = jnp.ones(rows, bool)
    if integer and ignore_index is not None:
        valid_row = labels_ != ignore_index
    live = live & jnp.expand_dims(valid_row, axis_)
    # What an ignored or masked place held (NaN, inf) is replaced before anything reads
    # it; jnp.where's derivative sends exactly 0 back there.
    x_live = jnp.where(live, x, 0.0)
    if cap is not None:
        # Capped in the compute dtype (float32 for half-precision logits), after the
        # replacement above, so an ignored NaN never reaches tanh.
        acc = compute_dtype(x.dtype)
        cap_ = cap if isinstance(cap, float) else cap.astype(acc)
        x_live = soft_cap(x_live.astype(acc), cap_)
    lse, _ = lse_rows(x_live, live, None, (axis_,), 0.0)
    dtype = lse.dtype
    if integer:
        q = jax.nn.one_hot(labels_, classes, dtype=dtype, axis=axis_)
    else:
        q = labels_.astype(dtype)
    count = jnp.sum(live, axis=axis_, keepdims=True).astype(dtype)
    if not is_off(eps):
        uniform = jnp.where(live, 1.0 / jnp.maximum(count, 1.0), 0.0)
        q = (1.0 - eps) * q + eps * uniform
    # -sum_j q_j log p_j, each term 0 where q_j == 0 (a -inf logit with no target mass is
    # no 0 * inf) and its derivative in q_j the cost -log p_j there too (_target_weight).
    neg_log_p = lse - x_live.astype(dtype)
    cost = jnp.where(live, _target_weight.target_weight(q, neg_log_p), 0.0)
    loss = jnp.sum(cost, axis=axis_)
    lse = jnp.squeeze(lse, axis_)
    if not is_off(z):
        loss = loss + z * lse * lse
    counted = valid_row & (jnp.squeeze(count, axis_) > 0)
    if integer:
        bad = out_of_range(labels_, classes, counted, "softmax_cross_entropy")
        loss = poison(loss, bad)
    return reduce_loss(jnp.where(counted, loss, 0.0).astype(x.dtype), counted, reduction)


@allow_rank_promotion
def mean_over_valid(loss: ArrayLike, where: ArrayLike) -> jax.Array:
    """The mean of ``loss`` over the entries where ``where`` is true; 0, not NaN, when none
    is (a batch of padding only), with gradient 0.

    Args:
        loss: per-example losses, e.g. from :func:`softmax_cross_entropy`.
        where: boolean array broadcastable to ``loss``, e.g. ``labels != ignore_index``.

    Returns:
        A scalar in ``loss``'s dtype.
    """
    loss = checks.as_float_array(loss, "loss")
    where_ = checks.check_where(where, loss.shape)
    assert where_ is not None
    return mean_where(loss, jnp.broadcast_to(where_, loss.shape))
