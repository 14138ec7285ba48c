"""What every section of ``python -m benchmarks.accelerator`` shares: the shapes of a full
and a quick run, the JSON records a section's process prints, budgeted interleaved timing,
and the questions asked of a compiled program (bytes accessed, will it fit in memory).

A section runs in its own process and prints one JSON record per line as it goes, so a
process that dies or runs out of time still hands back every row it finished.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

from benchmarks.timing import Case, round_robin

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes one run measures, and how long it may spend timing each group of cases.

    Attributes:
        ops: the ``(rows, columns)`` input of the elementwise and softmax-family ops.
        lengths: causal self-attention lengths (batch 1).
        heads, head_dim: attention's heads and head dimension.
        loss: ``(tokens, hidden, vocab)`` of the fused loss.
        group_budget_s: timed seconds per group of interleaved cases, once it has run
            ``min_runs``; never more than ``max_runs`` rounds.
    """

    ops: tuple[int, int]
    lengths: tuple[int, ...]
    heads: int
    head_dim: int
    loss: tuple[int, int, int]
    group_budget_s: float
    min_runs: int
    max_runs: int


# The shapes: 1 GiB float32 op inputs; 8 heads of dim 128; a 128k vocabulary.
FULL = Shapes((8192, 32768), (4096, 16384, 32768), 8, 128, (8192, 4096, 131072), 2.0, 3, 20)
# The same code on tiny shapes, so that the whole run fits in well under a minute on 2 CPUs.
QUICK = Shapes((64, 512), (128,), 2, 32, (64, 128, 1024), 0.05, 2, 3)


def shapes(quick: bool) -> Shapes:
    return QUICK if quick else FULL


def emit(**record: Any) -> None:
    """Print one record for the parent process (flushed: the process may die next)."""
    print(json.dumps(record), flush=True)


def failure(error: BaseException) -> str:
    """``n/a (...)`` for a contender that raised: the error's type and first line."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if "RESOURCE_EXHAUSTED" in first or "out of memory" in first.lower():
        return f"n/a (out of memory: {first[:120]})"
    return f"n/a ({type(error).__name__}: {first[:120]})"


class Deadline:
    """The section's time allowance: once spent, what is left is reported, not run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() > self.end

    def status(self) -> str:
        return f"n/a (not run: the section's {self.seconds:.0f} s allowance was spent)"


def device_record() -> dict[str, Any]:
    """The first device's platform, kind and memory pool (``None`` where it has no stats)."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats()
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "bytes_limit": None if stats is None else stats.get("bytes_limit"),
    }


def bytes_accessed(compiled: Any) -> float | None:
    """``compiled.cost_analysis()['bytes accessed']`` (a list of dicts in older jax);
    ``None`` where XLA cannot cost the program."""
    if 'custom_call_target="stablelayers' in compiled.as_text():
        # XLA costs a custom call (stablelayers' CPU kernels) at -1 and leaves it out of
        # the total: the total would count only the code around it.
        return None
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends have no cost model
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    value = analysis.get("bytes accessed")
    # XLA reports -1 for a program it cannot cost (a custom call: the CPU kernels).
    return None if value is None or value < 0 else float(value)


def temp_bytes(compiled: Any) -> int | None:
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def too_big(compiled: Any) -> str | None:
    """``n/a (...)`` when the program's temporaries and outputs exceed the device's free
    memory (asked before running it: an out-of-memory failure can leave the allocator
    fragmented for the cases after it); ``None`` when it fits or the device cannot say."""
    import jax

    stats = jax.devices()[0].memory_stats()
    analysis = compiled.memory_analysis()
    if not stats or analysis is None or "bytes_limit" not in stats:
        return None
    need = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if need <= free:
        return None
    return (
        f"n/a (does not fit: needs {need / GIB:.1f} GiB of device memory, "
        f"{free / GIB:.1f} GiB free)"
    )


def time_cases(cases: list[Case], sizes: Shapes) -> dict[Hashable, tuple[float, int]]:
    """Median milliseconds and number of timed runs of each case, interleaved.

    One untimed round (first-call allocations) and one timed round say how long a round
    takes; then as many more rounds as fit ``sizes.group_budget_s``, between ``min_runs``
    and ``max_runs`` in all. Each call blocks until its result is ready.
    """
    if not cases:
        return {}
    begin = time.perf_counter()
    times = round_robin(cases, warmup=1, runs=1)
    first_round = (time.perf_counter() - begin) / 2
    more = int(sizes.group_budget_s / max(first_round, 1e-6))
    more = min(max(more, sizes.min_runs - 1), sizes.max_runs - 1)
    if more > 0:
        for key, extra in round_robin(cases, warmup=0, runs=more).items():
            times[key] += extra
    return {key: (_median(values), len(values)) for key, values in times.items()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def blocking(compiled: Callable[..., Any], *args: Any) -> Callable[[], None]:
    """A call of ``compiled(*args)`` that waits for the result and then drops it."""
    import jax

    def call() -> None:
        jax.block_until_ready(compiled(*args))

    return call


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
