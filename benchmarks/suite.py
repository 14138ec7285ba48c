"""One process's measurements: time, memory and accuracy for a list of contenders."""

from __future__ import annotations

import sys

from benchmarks import accuracy
from benchmarks.config import OPS, Config
from benchmarks.contender import MODES, Contender
from benchmarks.inputs import Inputs
from benchmarks.results import Bound, Memory, Results, Timing
from benchmarks.timing import Case, bound_cases, round_robin


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only the tables."""
    print(f"[benchmarks] {message}", file=sys.stderr, flush=True)


def run_suite(config: Config, contenders: list[Contender], process: str) -> Results:
    """Measure every op of every contender; ``process`` labels the timings (see Timing)."""
    results = Results()
    for shape in config.shapes:
        inputs = Inputs(shape)
        log(f"{process}: compiling for {shape}")
        # Contenders for the same op and mode sit next to each other in a round, so the
        # timings that get divided are taken moments apart.
        cases = [
            Case((c.name, op, mode), c.timed_call(op, mode, inputs))
            for op in OPS
            for mode in MODES
            for c in contenders
            if op in c.ops
        ]
        cases += bound_cases(inputs)
        log(f"{process}: timing {len(cases)} cases x {config.warmup}+{config.runs} rounds")
        times = round_robin(cases, config.warmup, config.runs)
        for key, ms in times.items():
            if isinstance(key, tuple):
                name, op, mode = key
                results.timings.append(Timing(process, name, op, shape, mode, ms))
            else:
                results.bounds.append(Bound(process, shape, key, ms))
        del cases  # drop the compiled calls' references to this shape's inputs
        log(f"{process}: memory at {shape}")
        for c in contenders:
            for op in c.ops:
                residual = c.residual_bytes(op, inputs)
                temp = c.temp_bytes(op, inputs)
                results.memory.append(Memory(c.name, op, shape, inputs.nbytes, residual, temp))
        del inputs
    # The data set is part of the repository: a missing file fails the run (np.load raises).
    log(f"{process}: accuracy on {config.hard_inputs}")
    results.accuracy = accuracy.score(contenders, config.hard_inputs)
    return results
