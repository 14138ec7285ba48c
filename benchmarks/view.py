"""Lookups over one run's results, shared by the report's tables and the chart."""

from __future__ import annotations

from benchmarks.config import Config
from benchmarks.results import Accuracy, Memory, Results, Timing
from benchmarks.timing import BOUND_OF_MODE

ANCHOR = "stablelayers"


class View:
    """One run's results and configuration, and the questions the report asks of them."""

    def __init__(self, results: Results, config: Config) -> None:
        self.results = results
        self.config = config
        # In the order they were measured: stablelayers, jax.nn, ..., the child's last.
        self.contenders = list(dict.fromkeys(t.contender for t in results.timings))

    def timing(self, contender: str, op: str, shape: tuple, mode: str) -> Timing | None:
        for t in self.results.timings:
            if (t.contender, t.op, t.shape, t.mode) == (contender, op, shape, mode):
                return t
        return None

    def bound(self, process: str, shape: tuple, mode: str) -> float | None:
        """Median ms of the bandwidth kernel for ``mode``, as timed by ``process``."""
        for b in self.results.bounds:
            if (b.process, b.shape, b.kernel) == (process, shape, BOUND_OF_MODE[mode]):
                return b.median
        return None

    def over_bound(self, t: Timing) -> float | None:
        """A timing's median as a multiple of its own process's bound."""
        bound = self.bound(t.process, t.shape, t.mode)
        return t.median / bound if bound else None

    def ratio(self, op: str, shape: tuple, mode: str, other: str) -> float | None:
        """stablelayers' median over ``other``'s, both from the process that timed ``other``
        (so the two were interleaved)."""
        theirs = self.timing(other, op, shape, mode)
        if theirs is None:
            return None
        for t in self.results.timings:
            key = (t.process, t.contender, t.op, t.shape, t.mode)
            if key == (theirs.process, ANCHOR, op, shape, mode):
                return t.median / theirs.median
        return None

    def memory(self, contender: str, op: str, shape: tuple) -> Memory | None:
        for m in self.results.memory:
            if (m.contender, m.op, m.shape) == (contender, op, shape):
                return m
        return None

    def accuracy(self, contender: str, op: str, set_name: str, kind: str) -> Accuracy | None:
        for a in self.results.accuracy:
            if (a.contender, a.op, a.set, a.kind) == (contender, op, set_name, kind):
                return a
        return None
