"""The PNG chart: time over the bandwidth bound per op and shape, and worst ULP per op."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only: no display on a benchmark machine

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

from benchmarks.config import OPS
from benchmarks.contender import MODES
from benchmarks.markdown import shape_label
from benchmarks.view import View

_TITLES = {"forward": "forward", "value_and_grad": "value-and-grad of sum(f(x) * w)"}


def _bars(ax, groups: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(positions + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(positions, groups, fontsize=9)


def write_chart(view: View, path: pathlib.Path) -> None:
    """Three panels, one above the other so that the chart stays legible at the width of a
    docs page, all log scale: forward and value-and-grad median time as a multiple of the
    bandwidth bound (1.0 = moves only the bytes it must, at copy speed), and forward and
    gradient worst ULP over all sets."""
    fig, axes = plt.subplots(3, 1, figsize=(10, 13))
    groups = [(op, shape) for op in OPS for shape in view.config.shapes]
    labels = [f"{op}\n{shape_label(shape)}" for op, shape in groups]
    for ax, mode in zip(axes[:2], MODES, strict=True):
        series = {}
        for name in view.contenders:
            values = []
            for op, shape in groups:
                t = view.timing(name, op, shape, mode)
                over = view.over_bound(t) if t else None
                values.append(over if over else np.nan)
            if not all(np.isnan(values)):
                series[name] = values
        _bars(ax, labels, series)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        # Log scale: one slow contender (torch on a busy machine) must not flatten the rest.
        ax.set_yscale("log")
        # Plain numbers on the log axis at 1, 2, 3, 5, 10, ...: the figures span less than
        # a decade, where powers of ten alone would leave a single label.
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.grid(axis="y", which="major", linewidth=0.4, alpha=0.5)
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(_TITLES[mode], fontsize=11)
        ax.set_ylabel("time / bandwidth bound\n(lower is better)")
    _accuracy_panel(axes[2], view)
    fig.suptitle(f"stablelayers benchmarks, {view.results.info.get('date', '')}", fontsize=12)
    handles, names = axes[0].get_legend_handles_labels()
    # One legend above the panels, where it hides no bar.
    fig.legend(handles, names, loc="upper center", ncols=len(names), bbox_to_anchor=(0.5, 0.97))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _accuracy_panel(ax, view: View) -> None:
    acc = view.results.accuracy
    groups = [(op, kind) for op in OPS for kind in ("forward", "gradient")]
    labels = [f"{op}\n{'' if kind == 'forward' else 'grad'}".strip() for op, kind in groups]
    series = {}
    for name in view.contenders:
        values = []
        for op, kind in groups:
            worst = [
                a.worst_ulp for a in acc if (a.contender, a.op, a.kind) == (name, op, kind)
            ]
            # A log axis cannot show 0 ULP; a floor of 0.1 keeps exact results visible.
            values.append(max(max(worst), 0.1) if worst else np.nan)
        if not all(np.isnan(values)):
            series[name] = values
    if not series:
        ax.set_axis_off()
        return
    _bars(ax, labels, series)
    ax.set_yscale("log")
    ax.set_title("worst ULP over all hard_inputs sets", fontsize=11)
    ax.set_ylabel("ULP (lower is better)")
