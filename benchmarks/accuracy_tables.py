"""The report's accuracy tables: worst ULP per set, forward and gradient, and softplus."""

from __future__ import annotations

from benchmarks.accuracy import ROW_OPS
from benchmarks.config import SETS
from benchmarks.contender import FORWARD
from benchmarks.markdown import fmt_ulp, table
from benchmarks.view import View

GRADIENT = "gradient"


def accuracy_section(view: View) -> list[str]:
    if not view.results.accuracy:
        return []
    lines = [
        "## Accuracy",
        "",
        "Worst error in ULP over the normal-range entries of each set of `hard_inputs.npz`, "
        "scored as its README says (`benchmarks/ulp.py`). non-finite: inf/NaN outputs where "
        "the reference is finite and within float32 range. flushed: true subnormals (the "
        "reference rounds to a nonzero float32 subnormal) that came back as 0.",
        "",
    ]
    for kind, title in ((FORWARD, "Forward"), (GRADIENT, "Gradient of sum(f(x) * w)")):
        header = ["op", "contender", *SETS, "worst", "non-finite", "flushed"]
        if kind == GRADIENT:
            header.append("rel. err at dominant arg-max")
        rows = [
            _row(view, name, op, kind)
            for op in ROW_OPS
            for name in view.contenders
            if view.accuracy(name, op, SETS[0], kind)
        ]
        lines += [f"### {title}", "", *table(header, rows), ""]
    header = ["contender", "softplus ULP", "derivative ULP", "non-finite", "flushed"]
    rows = []
    for name in view.contenders:
        fwd = view.accuracy(name, "softplus", "softplus", FORWARD)
        grad = view.accuracy(name, "softplus", "softplus", GRADIENT)
        if fwd and grad:
            counts = [str(fwd.non_finite + grad.non_finite), str(fwd.flushed + grad.flushed)]
            rows.append([name, fmt_ulp(fwd.worst_ulp), fmt_ulp(grad.worst_ulp), *counts])
    return [*lines, "### softplus on `softplus/x`", "", *table(header, rows), ""]


def _row(view: View, name: str, op: str, kind: str) -> list[str]:
    found = [view.accuracy(name, op, s, kind) for s in SETS]
    cells = [op, name] + [fmt_ulp(a.worst_ulp) if a else "" for a in found]
    cells.append(f"**{fmt_ulp(max(a.worst_ulp for a in found if a))}**")
    cells.append(str(sum(a.non_finite for a in found if a)))
    cells.append(str(sum(a.flushed for a in found if a)))
    if kind == GRADIENT:
        dominant = found[SETS.index("dominant")]
        rel = dominant.argmax_rel if dominant else None
        cells.append("" if rel is None else f"{rel:.1e}")
    return cells
