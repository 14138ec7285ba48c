"""Interleaved wall-clock timing, and the memory-bandwidth bound it is compared with."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import time
from collections.abc import Callable, Hashable

import jax

from benchmarks.inputs import Inputs

# The bandwidth model. An op over x needs at least these x-sized transfers to and from
# memory (rows of <= 16 KiB fit in cache, so a row's reductions cost no extra pass):
#   forward         read x, write y                  -> 2 transfers, like `copy`:  y = 2 x
#   value-and-grad  read x, read w, write dx (the   -> 3 transfers, like `axpy`: z = 2 x + w
#                   value is a scalar)
# Each bound is the measured median time of the kernel with that same traffic, run in the
# same rounds as the contenders, so it drifts with them.
BOUND_KERNELS = {"copy": (lambda x, w: 2.0 * x), "axpy": (lambda x, w: 2.0 * x + w)}
BOUND_OF_MODE = {"forward": "copy", "value_and_grad": "axpy"}


@dataclasses.dataclass
class Case:
    """One timed thing: ``key`` names it, ``call`` runs it once and waits for the result."""

    key: Hashable
    call: Callable[[], None]


def bound_cases(inputs: Inputs) -> list[Case]:
    """The copy and axpy kernels over ``inputs``, compiled, as cases keyed by kernel name."""
    x, w = inputs.jax
    cases = []
    for name, kernel in BOUND_KERNELS.items():
        compiled = jax.jit(kernel).lower(x, w).compile()
        cases.append(
            Case(name, _blocking(compiled, [(x, w) for x, w, _ in inputs.jax_placements]))
        )
    return cases


def _blocking(compiled: Callable, arg_sets: list[tuple]) -> Callable[[], None]:
    # Cycles through the input placements like the contenders do (see benchmarks.inputs).
    calls = itertools.count()

    def call() -> None:
        jax.block_until_ready(compiled(*arg_sets[next(calls) % len(arg_sets)]))

    return call


def round_robin(cases: list[Case], warmup: int, runs: int) -> dict[Hashable, list[float]]:
    """Run every case once per round, ``warmup`` untimed rounds then ``runs`` timed ones.

    Returns milliseconds per run for each key. Interleaving means drift of a shared machine
    (another job, thermal limits) hits every contender alike; the start of each round moves
    by one so no case always follows the same neighbour.
    """
    times: dict[Hashable, list[float]] = {case.key: [] for case in cases}
    gc.collect()
    gc.disable()  # a collection inside a timed call would be charged to whichever case ran
    try:
        for round_index in range(warmup + runs):
            start = round_index % len(cases)
            for case in cases[start:] + cases[:start]:
                begin = time.perf_counter()
                case.call()
                elapsed = time.perf_counter() - begin
                if round_index >= warmup:
                    times[case.key].append(elapsed * 1e3)
    finally:
        gc.enable()
    return times
