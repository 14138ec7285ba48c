"""The command-line flags both examples share."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, and keeps the description's and epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # A None or False default is explained by the help text itself (or is a switch).
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(
    script: str, doc: str, frameworks: tuple[str, ...], evals: int
) -> argparse.ArgumentParser:
    """An argument parser with the run-control flags every example has; by default a run
    evaluates ``evals`` times. Read the arguments with :func:`parse`."""
    summary, _, rest = doc.strip().partition("\n\n")
    p = argparse.ArgumentParser(
        prog=f"python examples/{script}.py",
        description=summary,
        epilog=rest,
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--framework",
        choices=frameworks,
        default=frameworks[0],
        help="which framework defines the model (the data, loop and optimiser are shared)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="total number of optimiser steps; fewer makes a quick run. With --resume, "
        "training continues from the checkpoint's step up to this total",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory for the checkpoint, metrics.json and curves.png "
        f"(default: runs/{script}-<framework>)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="load the checkpoint in --out (parameters, optimiser state, step, loss "
        "history) and continue training from its step",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split and shuffling, and of the initial parameters",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=f"evaluate on the validation split every this many steps (default: "
        f"--steps // {evals})",
    )
    p.set_defaults(script=script, evals=evals)
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, with the defaults that depend on other flags filled in."""
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path("runs") / f"{args.script}-{args.framework}"
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1.")
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // args.evals)
    return args


def settings(args: argparse.Namespace) -> dict:
    """The flags that define a run, saved in its metrics.json (where it goes and whether it
    resumed do not define it)."""
    skip = ("out", "resume", "script", "evals")
    return {k: v for k, v in vars(args).items() if k not in skip}
