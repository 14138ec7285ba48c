"""The report's memory table: bytes kept for the backward pass, and XLA's scratch bytes."""

from __future__ import annotations

from benchmarks.config import OPS
from benchmarks.markdown import fmt_bytes, shape_label, table
from benchmarks.view import View


def memory_section(view: View) -> list[str]:
    header, rows = ["op", "contender"], []
    for shape in view.config.shapes:
        header += [f"kept for backward, {shape_label(shape)}", "XLA temp, v&g"]
    for op in OPS:
        for name in view.contenders:
            cells = [op, name]
            for shape in view.config.shapes:
                m = view.memory(name, op, shape)
                if m is None:
                    cells += ["", ""]
                else:
                    kept = fmt_bytes(m.residual_bytes, m.x_bytes)
                    cells += [kept, fmt_bytes(m.temp_bytes, m.x_bytes)]
            if any(cells[2:]):
                rows.append(cells)
    return [
        "## Memory",
        "",
        "Kept for backward: the residuals, i.e. the leaves of the function `jax.vjp(f, x)` "
        "returns (x itself counts if it is one: the backward pass keeps it alive); torch: "
        "the tensors autograd saves, seen through `saved_tensors_hooks`. XLA temp: "
        "`memory_analysis().temp_size_in_bytes` of the compiled value-and-grad. In MiB and "
        "in arrays the size of x.",
        "",
        *table(header, rows),
        "",
    ]
