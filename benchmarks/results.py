"""The measured records, and their round trip through JSON (the child process hands its
results back that way)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics


@dataclasses.dataclass
class Timing:
    """Milliseconds per run of one contender's op in one mode at one shape.

    ``process`` tells which process measured it: ratios are only taken between timings of
    the same process, because those were interleaved with each other.
    """

    process: str
    contender: str
    op: str
    shape: tuple[int, ...]
    mode: str
    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def low(self) -> float:
        return min(self.times_ms)

    @property
    def high(self) -> float:
        return max(self.times_ms)


@dataclasses.dataclass
class Bound:
    """Milliseconds per run of a bandwidth kernel (see ``timing.BOUND_KERNELS``)."""

    process: str
    shape: tuple[int, ...]
    kernel: str
    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)


@dataclasses.dataclass
class Memory:
    """Bytes kept for the backward pass, and XLA's scratch bytes for value-and-grad."""

    contender: str
    op: str
    shape: tuple[int, ...]
    x_bytes: int
    residual_bytes: int
    temp_bytes: int | None


@dataclasses.dataclass
class Accuracy:
    """Errors of one contender's op on one input set of hard_inputs.npz.

    ``kind`` is ``forward`` or ``gradient`` (of ``sum(f(x) * w)``; for softplus, ``w = 1``:
    the derivative). ``argmax_rel`` is the worst relative gradient error at the arg-max of a
    row, for the ``dominant`` set only.
    """

    contender: str
    op: str
    set: str
    kind: str
    worst_ulp: float
    non_finite: int
    flushed: int
    argmax_rel: float | None = None


@dataclasses.dataclass
class Results:
    """Everything one run measured, plus notes for the report (``frameworks``: what Flax and
    Equinox offer, see ``contenders.framework_contenders``)."""

    info: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    frameworks: list[str] = dataclasses.field(default_factory=list)
    timings: list[Timing] = dataclasses.field(default_factory=list)
    bounds: list[Bound] = dataclasses.field(default_factory=list)
    memory: list[Memory] = dataclasses.field(default_factory=list)
    accuracy: list[Accuracy] = dataclasses.field(default_factory=list)

    def merge(self, other: Results) -> None:
        """Append another process's records (its info is not needed: same machine)."""
        self.notes += other.notes
        self.timings += other.timings
        self.bounds += other.bounds
        self.memory += other.memory
        self.accuracy += other.accuracy

    def save(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: pathlib.Path) -> Results:
        raw = json.loads(path.read_text())

        def rebuild(record_type, rows):
            # JSON turns shape tuples into lists; tuples keep them usable as dict keys.
            return [record_type(**{**r, **_shape(r)}) for r in rows]

        return cls(
            info=raw["info"],
            notes=raw["notes"],
            frameworks=raw["frameworks"],
            timings=rebuild(Timing, raw["timings"]),
            bounds=rebuild(Bound, raw["bounds"]),
            memory=rebuild(Memory, raw["memory"]),
            accuracy=rebuild(Accuracy, raw["accuracy"]),
        )


def _shape(row: dict) -> dict:
    return {"shape": tuple(row["shape"])} if "shape" in row else {}
