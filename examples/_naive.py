"""``--compare-naive``: the same model, weights and batches with stablelayers' attention
and with the textbook one, side by side for a few optimiser steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _data import PAD
from _train import Model


@dataclass
class StepReport:
    """One training step of one attention: loss and gradient before the update."""

    loss: float
    grad_norm: float
    nan_grads: int  # gradient entries that are NaN
    size: int  # gradient entries in all


def _train_step(model: Model, loss_fn, optimizer):
    @jax.jit
    def step(params, opt_state, rows):
        loss, grads = jax.value_and_grad(loss_fn)(params, rows)
        leaves = jax.tree.leaves(grads)
        nan = sum(jnp.isnan(g).sum() for g in leaves)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        report = (loss, optax.tree.norm(grads), nan)
        return optax.apply_updates(params, updates), opt_state, report

    return step


def fully_masked_rows(rows: np.ndarray) -> int:
    """Query rows of the batch whose keys are all masked: one per padded input position."""
    return int((rows[:, :-1] == PAD).sum())


@dataclass
class Comparison:
    """Per step: the batch's fully masked query rows, and each contender's report."""

    masked_rows: list[int]
    reports: dict[str, list[StepReport]]


def compare(
    models: dict[str, Model],
    make_loss: Callable[[Model], Callable],
    optimizer: optax.GradientTransformation,
    batch_at: Callable[[int], np.ndarray],
    steps: int,
) -> Comparison:
    """Train each model in ``models`` for ``steps`` steps on the same batches; report
    every step's loss, gradient norm and NaN count."""
    reports: dict[str, list[StepReport]] = {name: [] for name in models}
    for name, model in models.items():
        step_fn = _train_step(model, make_loss(model), optimizer)
        params, opt_state = model.params, optimizer.init(model.params)
        size = sum(int(np.size(p)) for p in jax.tree.leaves(params))
        for step in range(1, steps + 1):
            params, opt_state, (loss, norm, nan) = step_fn(params, opt_state, batch_at(step))
            reports[name].append(StepReport(float(loss), float(norm), int(nan), size))
    masked = [fully_masked_rows(batch_at(step)) for step in range(1, steps + 1)]
    return Comparison(masked, reports)


def print_table(comparison: Comparison) -> None:
    """One line per step: the batch's fully masked rows, then each contender's loss,
    gradient norm and NaN gradient entries; then a verdict per contender."""
    reports = comparison.reports
    names = list(reports)
    width = max(28, *(len(n) for n in names))
    print(f"{'':16}" + "".join(f" | {name:^{width}}" for name in names))
    print(
        f"{'step masked rows':16}"
        + f" | {'loss':>8} {'grad norm':>9} {'NaN grads':>9}" * len(names)
    )
    for i, masked in enumerate(comparison.masked_rows):
        line = f"{i + 1:>4} {masked:>11}"
        for name in names:
            r = reports[name][i]
            line += f" | {r.loss:>8.4f} {r.grad_norm:>9.4g} {r.nan_grads:>9}".ljust(width + 3)
        print(line)
    for name in names:
        size = reports[name][0].size
        print(f"{name} ({size:,} gradient entries): {_verdict(reports[name])}")


def _verdict(steps: list[StepReport]) -> str:
    nan_loss = [i + 1 for i, r in enumerate(steps) if np.isnan(r.loss)]
    nan_grad = [i + 1 for i, r in enumerate(steps) if r.nan_grads]
    if not nan_loss and not nan_grad:
        return f"finite loss and gradients at all {len(steps)} steps"
    parts = []
    if nan_loss:
        parts.append(f"loss NaN from step {nan_loss[0]} ({len(nan_loss)}/{len(steps)} steps)")
    if nan_grad:
        parts.append(
            f"NaN gradients from step {nan_grad[0]} ({len(nan_grad)}/{len(steps)} steps)"
        )
    return "; ".join(parts)
