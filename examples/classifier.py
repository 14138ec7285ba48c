"""Classify scikit-learn's 8x8 handwritten digits with an MLP built from stablelayers.

Two hidden layers with learnable-temperature `Softplus` activations, a `LogSoftmax`
output and the negative log-likelihood loss, trained with Optax's AdamW (cosine decay,
Gaussian input noise) on 80% of the 1797 digits and scored on the held-out 20%
(stratified, fixed by --seed). The same data, loop and optimiser serve the Flax NNX,
Flax Linen and Equinox versions of the model.

Writes to --out: checkpoint (Orbax; checkpoint.eqx for Equinox), metrics.json and
curves.png. Example: python examples/classifier.py --framework equinox
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the run's wall time includes importing JAX

import argparse  # noqa: E402
import importlib  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _cli  # noqa: E402
import _data  # noqa: E402
import stablelayers as sl  # noqa: E402
from _parallel import Placement  # noqa: E402
from _train import Run, Trained, fit  # noqa: E402

FRAMEWORKS = ("nnx", "linen", "equinox")


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("classifier", __doc__, FRAMEWORKS, evals=20)
    p.set_defaults(steps=1500)
    p.add_argument("--hidden", type=int, default=128, help="width of both hidden layers")
    p.add_argument("--batch-size", type=int, default=64, help="digits per training step")
    p.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="AdamW's initial learning rate, decayed to 0 along a cosine over --steps",
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW's decoupled weight decay"
    )
    p.add_argument(
        "--input-noise",
        type=float,
        default=0.6,
        help="standard deviation of the Gaussian noise added to the standardised training "
        "pixels (a regulariser; 0 turns it off)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return _cli.parse(build_parser(), argv)


def main(argv: Sequence[str] | None = None) -> Trained:
    args = parse_args(argv)
    data = _data.load_digits(args.seed)
    models = importlib.import_module(f"_{args.framework}_models")
    model = models.mlp((data.x_train.shape[1], args.hidden, args.hidden, 10), args.seed)
    optimizer = optax.adamw(
        optax.cosine_decay_schedule(args.lr, args.steps), weight_decay=args.weight_decay
    )

    def nll(params, x, y):
        # The model ends in LogSoftmax; log-probabilities are logits too (their logsumexp
        # is 0), so the cross-entropy on them is the negative log-likelihood.
        log_probs = model.apply(params, x)
        return sl.softmax_cross_entropy(log_probs, y).mean(), log_probs

    @jax.jit
    def val_metrics(params):
        loss, log_probs = nll(params, data.x_val, data.y_val)
        return loss, (log_probs.argmax(1) == data.y_val).mean()

    def evaluate(params) -> dict[str, float]:
        loss, accuracy = val_metrics(params)
        return {"loss": float(loss), "accuracy": float(accuracy)}

    def batch_at(step: int) -> tuple[np.ndarray, np.ndarray]:
        index = _data.epoch_batch(len(data.y_train), args.batch_size, args.seed, step)
        # Gaussian noise on the (standardised) pixels: 1437 digits are few enough that the
        # MLP memorises them otherwise, and noise regularises better here than weight decay.
        noise = np.random.default_rng([args.seed, step]).standard_normal(
            (len(index), data.x_train.shape[1])
        )
        x = data.x_train[index] + args.input_noise * noise.astype(np.float32)
        return x, data.y_train[index]

    run = Run(
        loss=lambda params, batch: nll(params, *batch)[0],
        batch_at=batch_at,
        evaluate=evaluate,
        steps=args.steps,
        eval_every=args.eval_every,
        out=args.out,
        framework=args.framework,
        resume=args.resume,
        placement=Placement(),
        config=_cli.settings(args),
        must_match=("framework", "hidden"),
        name="classifier",
    )
    trained = fit(model, optimizer, run)
    print(f"curves: {trained.plot}  checkpoint: {trained.checkpoint}")
    print(
        f"classifier {args.framework}: held-out accuracy {trained.val['accuracy']:.2%} "
        f"({len(data.y_val)} digits), held-out loss {trained.val['loss']:.4f}, "
        f"{trained.history.step} steps, training {trained.train_seconds:.1f} s, "
        f"total {time.perf_counter() - _STARTED:.1f} s"
    )
    return trained


if __name__ == "__main__":
    main()
