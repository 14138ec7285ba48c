"""Accuracy on tests/data/hard_inputs.npz: ULP errors, non-finite outputs, flushed
subnormals, and the gradient at the arg-max of dominant rows."""

from __future__ import annotations

import pathlib

import numpy as np

from benchmarks.config import SETS
from benchmarks.contender import Contender
from benchmarks.results import Accuracy
from benchmarks.ulp import flushed_subnormals, ulp_error, worst_relative_error

ROW_OPS = ("softmax", "log_softmax")


def score(contenders: list[Contender], path: pathlib.Path) -> list[Accuracy]:
    """Score every contender's ops on every set of the file at ``path``."""
    with np.load(path) as npz:
        data = dict(npz)
    # All sets have 1024 columns and the ops work row by row, so one call on the stacked
    # rows gives each set's answer with one compilation instead of one per set.
    x = np.concatenate([data[f"{name}/x"] for name in SETS])
    w = np.concatenate([data[f"{name}/w"] for name in SETS])
    starts = np.cumsum([0, *(len(data[f"{name}/x"]) for name in SETS)])
    spans = {name: (int(starts[i]), int(starts[i + 1])) for i, name in enumerate(SETS)}
    records = []
    for contender in contenders:
        for op in (op for op in ROW_OPS if op in contender.ops):
            y = contender.forward(op, x)
            g = contender.gradient(op, x, w)
            for name, (lo, hi) in spans.items():
                records.append(
                    _record(contender.name, op, name, "forward", y[lo:hi], data[f"{name}/{op}"])
                )
                grad = _record(
                    contender.name, op, name, "gradient", g[lo:hi], data[f"{name}/{op}_vjp"]
                )
                if name == "dominant":
                    grad.argmax_rel = _argmax_rel(x[lo:hi], g[lo:hi], data[f"{name}/{op}_vjp"])
                records.append(grad)
        if "softplus" in contender.ops:
            xs = data["softplus/x"]
            y = contender.forward("softplus", xs)
            g = contender.gradient("softplus", xs, np.ones_like(xs))
            records.append(
                _record(
                    contender.name,
                    "softplus",
                    "softplus",
                    "forward",
                    y,
                    data["softplus/softplus"],
                )
            )
            records.append(
                _record(
                    contender.name,
                    "softplus",
                    "softplus",
                    "gradient",
                    g,
                    data["softplus/sigmoid"],
                )
            )
    return records


def _record(contender: str, op: str, name: str, kind: str, y, reference) -> Accuracy:
    worst, non_finite = ulp_error(y, reference)
    return Accuracy(
        contender, op, name, kind, worst, non_finite, flushed_subnormals(y, reference)
    )


def _argmax_rel(x: np.ndarray, g: np.ndarray, reference: np.ndarray) -> float:
    # At a dominant row's arg-max, g_k - sum(g * y) cancels almost completely; this is the
    # entry where a naive backward pass loses every digit.
    top = np.argmax(x, axis=-1)[:, None]
    return worst_relative_error(
        np.take_along_axis(g, top, -1), np.take_along_axis(reference, top, -1)
    )
