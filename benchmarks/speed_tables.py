"""The report's speed tables: times per shape, and stablelayers' ratios to the others."""

from __future__ import annotations

from benchmarks.config import OPS
from benchmarks.contender import FORWARD, MODES
from benchmarks.markdown import DASH, fmt_ms, shape_label, table
from benchmarks.view import ANCHOR, View


def speed_section(view: View) -> list[str]:
    c = view.config
    lines = [
        "## Speed",
        "",
        f"float32, CPU, under `jax.jit` (torch: eager). Median of {c.runs} runs after "
        f"{c.warmup} warm-up rounds, [min{DASH}max], in ms; every case of a shape runs once "
        "per round, round-robin. Value-and-grad is of `sum(f(x) * w)` with respect to x. "
        "`/ bound` is the median over the memory-bandwidth bound measured in the same rounds "
        "(see Notes).",
        "",
    ]
    header = ["op", "contender", "forward ms", "/ bound", "value-and-grad ms", "/ bound"]
    for shape in c.shapes:
        rows = []
        for op in OPS:
            for name in view.contenders:
                cells = [op, name]
                for mode in MODES:
                    t = view.timing(name, op, shape, mode)
                    over = view.over_bound(t) if t else None
                    cells.append(
                        f"{fmt_ms(t.median)} [{fmt_ms(t.low)}{DASH}{fmt_ms(t.high)}]"
                        if t
                        else ""
                    )
                    cells.append(f"{over:.2f}" if over else "")
                if any(cells[2:]):
                    rows.append(cells)
        bound_cells = ["bandwidth bound", "copy / axpy"]
        for mode in MODES:
            bound = view.bound("main", shape, mode)
            bound_cells += [fmt_ms(bound) if bound else "", "1.00"]
        rows.append(bound_cells)
        lines += [f"### {shape_label(shape)}", "", *table(header, rows), ""]
    return lines


def ratio_section(view: View) -> list[str]:
    header, columns = ["op", "shape"], []
    for other in (n for n in view.contenders if n != ANCHOR):
        for mode in MODES:
            if any(t.contender == other and t.mode == mode for t in view.results.timings):
                header.append(f"{'fwd' if mode == FORWARD else 'v&g'} / {other}")
                columns.append((other, mode))
    rows = []
    for op in OPS:
        for shape in view.config.shapes:
            cells = [op, shape_label(shape)]
            for other, mode in columns:
                r = view.ratio(op, shape, mode, other)
                cells.append("" if r is None else f"{r:.2f}")
            rows.append(cells)
    return [
        "### Ratios",
        "",
        "stablelayers' median time over the other's (below 1: stablelayers is faster), each "
        "taken in the process that timed both, interleaved.",
        "",
        *table(header, rows),
        "",
    ]
