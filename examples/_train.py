"""The training loop both examples share, whatever the framework.

Each framework's model is reduced to a :class:`Model`: a pytree of trainable arrays and a
pure ``apply`` (``nnx.split``/``merge``, Linen's ``init``/``apply``,
``eqx.partition``/``combine``). Optax, ``jax.jit``, sharding and checkpointing then work on
plain pytrees, so this loop is written once.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import _checkpoint
import _report
from _parallel import Placement

PyTree = Any
Metrics = dict[str, float]


class Model(NamedTuple):
    """A model as a pure function of its parameters."""

    params: PyTree
    apply: Callable[..., jax.Array]  # apply(params, *inputs)


@dataclass
class Run:
    """How to train: everything :func:`fit` needs besides the model and optimiser.

    ``loss(params, batch)`` is the scalar training loss, ``batch_at(step)`` the batch of a
    (1-based) step as NumPy arrays, ``evaluate(params)`` the validation metrics (with a
    ``"loss"``). ``config`` is saved with the checkpoint; on ``--resume`` the entries named
    in ``must_match`` have to equal the saved ones (they fix the parameters' shapes).
    """

    loss: Callable[[PyTree, Any], jax.Array]
    batch_at: Callable[[int], Any]
    evaluate: Callable[[PyTree], Metrics]
    steps: int
    eval_every: int
    out: Path
    framework: str
    resume: bool
    placement: Placement
    config: dict[str, Any]
    must_match: tuple[str, ...]
    name: str
    baseline: tuple[str, float] | None = None  # drawn as a line on the plot


@dataclass
class Trained:
    """The outcome of :func:`fit`."""

    params: PyTree
    opt_state: PyTree
    history: _report.History
    val: Metrics  # the last evaluation
    resumed_val: Metrics | None  # the evaluation of the restored parameters, if resumed
    train_seconds: float
    plot: Path
    checkpoint: Path


def fit(model: Model, optimizer: optax.GradientTransformation, run: Run) -> Trained:
    """Train from scratch or from ``run.out``'s checkpoint up to step ``run.steps``; write
    the checkpoint, ``metrics.json`` and ``curves.png`` into ``run.out``.

    Ctrl-C stops early and still saves, so ``--resume`` carries on from there.
    """
    run.out.mkdir(parents=True, exist_ok=True)
    place = run.placement
    params = place.params(model.params)
    opt_state = place.params(optimizer.init(params))
    history, resumed_val = _report.History(), None
    if run.resume:
        params, opt_state, history, resumed_val = _restore(run, params, opt_state)

    step_fn = _train_step(run.loss, optimizer)
    if not history.val:
        history.val.append({"step": 0, **run.evaluate(params)})
    start, started = history.step, time.perf_counter()
    pending: list[tuple[int, jax.Array]] = []  # losses not yet copied to the host
    bar = tqdm(total=run.steps, initial=start, desc=run.name, unit="step", dynamic_ncols=True)
    try:
        for step in range(start + 1, run.steps + 1):
            batch = place.batch(run.batch_at(step))
            params, opt_state, loss = step_fn(params, opt_state, batch)
            pending.append((step, loss))
            # Reading a loss waits for its step; doing it every few steps keeps the
            # device queue full.
            if step % 10 == 0 or step == run.steps or step % run.eval_every == 0:
                _flush(pending, history, bar)
            if step % run.eval_every == 0 or step == run.steps:
                history.val.append({"step": step, **run.evaluate(params)})
                bar.set_postfix(_postfix(history), refresh=False)
    except KeyboardInterrupt:
        _flush(pending, history, bar)
        bar.write(f"interrupted at step {history.step}; saving, --resume continues")
        if history.val[-1]["step"] != history.step:
            history.val.append({"step": history.step, **run.evaluate(params)})
    finally:
        bar.close()
    seconds = time.perf_counter() - started

    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(history.step)}
    checkpoint = _checkpoint.save(run.out, run.framework, state)
    _report.save_metrics(run.out, history, run.config, history.val[-1])
    title = f"{run.name} ({run.framework})"
    plot = _report.plot_curves(history, run.out / "curves.png", title, run.baseline)
    return Trained(
        params, opt_state, history, history.val[-1], resumed_val, seconds, plot, checkpoint
    )


def _train_step(loss_fn, optimizer):
    # Donating the old parameters and optimiser state lets XLA update them in place; the
    # CPU backend cannot, and would warn about it on every compile.
    donate = () if jax.default_backend() == "cpu" else (0, 1)

    @functools.partial(jax.jit, donate_argnums=donate)
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _restore(run: Run, params, opt_state):
    history, saved_config = _report.load_metrics(run.out)
    changed = {
        k: (saved_config.get(k), run.config.get(k))
        for k in run.must_match
        if saved_config.get(k) != run.config.get(k)
    }
    if changed:
        detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(
            f"--resume: the checkpoint was trained with other settings ({detail})."
        )
    like = {"params": params, "opt_state": opt_state, "step": jnp.int32(0)}
    state = _checkpoint.restore(run.out, run.framework, like)
    step = int(state["step"])
    if step != history.step:
        raise SystemExit(
            f"--resume: the checkpoint is at step {step} but metrics.json at "
            f"{history.step}; they come from different runs."
        )
    params, opt_state = state["params"], state["opt_state"]
    # Evaluating the restored parameters proves they are the saved ones: the loss must
    # repeat the last evaluation of the run that wrote them.
    resumed_val = run.evaluate(params)
    saved = history.val[-1]["loss"]
    print(
        f"resumed {_checkpoint.path(run.out, run.framework)} at step {step}: "
        f"validation loss {resumed_val['loss']:.6f} (saved run: {saved:.6f})"
    )
    if not math.isclose(resumed_val["loss"], saved, rel_tol=1e-5, abs_tol=1e-7):
        print("warning: the restored parameters do not reproduce the saved validation loss")
    return params, opt_state, history, resumed_val


def _flush(pending, history, bar):
    if not pending:
        return
    losses = np.asarray(jax.device_get([loss for _, loss in pending]), dtype=float)
    history.train.extend((s, float(v)) for (s, _), v in zip(pending, losses, strict=True))
    bar.update(pending[-1][0] - bar.n)
    bar.set_postfix(_postfix(history), refresh=False)
    pending.clear()


def _postfix(history) -> dict[str, str]:
    recent = [loss for _, loss in history.train[-20:]]
    postfix = {"loss": f"{np.mean(recent):.4f}"} if recent else {}
    postfix["val"] = f"{history.val[-1]['loss']:.4f}"
    return postfix
