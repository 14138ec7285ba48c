"""What one run measures: shapes, repetitions, input and output paths."""

from __future__ import annotations

import dataclasses
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_HARD_INPUTS = REPO_ROOT / "tests" / "data" / "hard_inputs.npz"

OPS = ("softmax", "log_softmax", "softplus")

# The float32 sets of hard_inputs.npz, scored one by one; `dominant` also gets the relative
# gradient error at each row's arg-max.
SETS = ("normal_x1", "normal_x30", "normal_x1000", "normal_x10000", "f32max_mix", "dominant")


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark run.

    Attributes:
        shapes: float32 input shapes timed; the op works over the last axis.
        warmup: untimed rounds before the timed ones (first-touch page faults, caches).
        runs: timed rounds; every case runs once per round.
        quick: whether this is the smoke-test configuration.
        hard_inputs: path to hard_inputs.npz (``tests/data/`` by default; a missing file is an
            error).
    """

    shapes: tuple[tuple[int, ...], ...]
    warmup: int
    runs: int
    quick: bool
    hard_inputs: pathlib.Path = DEFAULT_HARD_INPUTS

    def to_args(self) -> list[str]:
        """Command-line flags that make a child process run this same configuration."""
        args = ["--quick"] if self.quick else []
        return [*args, "--hard-inputs", str(self.hard_inputs)]


def make_config(quick: bool, hard_inputs: pathlib.Path = DEFAULT_HARD_INPUTS) -> Config:
    """The full run (the issue's shapes) or the quick smoke run (same code, tiny shapes)."""
    if quick:
        return Config(((256, 1024), (4, 64, 1024)), 2, 10, True, hard_inputs)
    return Config(((4096, 4096), (64, 1024, 1024)), 3, 20, False, hard_inputs)
