"""The Markdown report: the header (date, machine, versions), every table, and the notes."""

from __future__ import annotations

from benchmarks.accuracy_tables import accuracy_section
from benchmarks.markdown import table
from benchmarks.memory_table import memory_section
from benchmarks.speed_tables import ratio_section, speed_section
from benchmarks.view import View

_NOTES = [
    "Bandwidth bound: an op over x must move at least this many x-sized arrays to or from "
    "memory (a row fits in cache, so its reductions need no extra pass): forward reads x and "
    "writes y (2), timed as the jitted `2 * x`; value-and-grad reads x and w and writes the "
    "gradient (3; the value is a scalar), timed as the jitted `2 * x + w`.",
    "glibc is told to keep freed buffers (`MALLOC_MMAP_MAX_=0 "
    "MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_ARENA_MAX=1`; the harness re-executes "
    "itself with them); otherwise page faults on fresh buffers dominate every figure. "
    "`OMP_WAIT_POLICY=PASSIVE` is set too: torch's OpenMP workers otherwise spin after "
    "each parallel region and take a core from the next contender (stablelayers' "
    "log_softmax measured 1.42x jax.nn's time without it, 1.00x with it; torch's times "
    "did not change).",
    "stablelayers runs its CPU kernels here (`STABLELAYERS_CPU_KERNELS=1`, the default): "
    "softmax, log_softmax and softplus with a constant beta, built on first use for this "
    "CPU. With `STABLELAYERS_CPU_KERNELS=0`, or on GPU and TPU, the same ops run as pure "
    "JAX, with the same semantics and the accuracy limits of the tests; their figures are "
    "those of the previous benchmark pages (git history of docs/benchmarks.md).",
    "At 4096x4096 every contender reads the same 3 copies of x and w, at different "
    "addresses, one after another (and the bounds do too): how fast a pass runs depends "
    "steadily on where its buffers sit relative to each other (`python -m "
    "benchmarks.placement` times softplus per copy: 2.0x between copies for stablelayers "
    "and 1.4x for jax.nn in one run here), so a median over one placement would be a draw "
    "of the allocator. The 256 MiB inputs of the larger shape have one copy (memory).",
    "`jax.nn custom_jvp` is jax.nn.softmax with `jax_softmax_custom_jvp=True`, a "
    "process-wide flag, so it runs in a child process beside stablelayers' softmax; its "
    "ratio comes from that process. The flag changes only softmax.",
    "The machine may be shared: the load average in the header says how busy it was. "
    "Ratios from interleaved runs hold up under load; absolute times do not, and torch's "
    "OpenMP threads suffer most when a core is taken (a parallel region waits for both).",
]


def render(view: View) -> str:
    """The whole report as Markdown."""
    info = view.results.info
    mode = (
        "quick smoke run: tiny shapes, figures mean nothing"
        if view.config.quick
        else "full run"
    )
    header_rows = [[k, v if k == "date" else f"`{v}`"] for k, v in info.items()]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python -m benchmarks` ({mode}) on {info.get('date', '?')}.",
        "",
        *table(["", ""], header_rows),
        "",
        # __main__ writes the chart beside this file, so the relative link always resolves.
        "![Time over the bandwidth bound, and worst ULP](benchmarks.png)",
        "",
        *speed_section(view),
        *ratio_section(view),
        *memory_section(view),
        *accuracy_section(view),
        *_notes_section(view),
    ]
    return "\n".join(lines) + "\n"


def _notes_section(view: View) -> list[str]:
    frameworks = [
        "Flax and Equinox, checked at run time:",
        *(f"  - {note}" for note in view.results.frameworks),
        "  - Their attention layers (`flax.linen.dot_product_attention`, "
        "`flax.nnx.MultiHeadAttention`, `equinox.nn.MultiheadAttention`) call "
        "`jax.nn.softmax`, so the jax.nn rows are what they run.",
    ]
    items = [*_NOTES, *frameworks, *view.results.notes]
    return ["## Notes", "", *(n if n.startswith("  ") else f"- {n}" for n in items), ""]
