"""What a run leaves behind besides its checkpoint: ``metrics.json`` (the loss curves and
final figures, which ``--resume`` continues) and ``curves.png``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class History:
    """Training loss at every step and validation metrics at every evaluation."""

    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)  # each has "step" and "loss"

    @property
    def step(self) -> int:
        return self.train[-1][0] if self.train else 0


def save_metrics(out: Path, history: History, config: dict[str, Any], final: dict) -> Path:
    target = out / "metrics.json"
    payload = {"config": config, "final": final, "history": asdict(history)}
    target.write_text(json.dumps(payload, indent=1) + "\n")
    return target


def load_metrics(out: Path) -> tuple[History, dict[str, Any]]:
    """The history and config of the run saved in ``out``."""
    payload = json.loads((out / "metrics.json").read_text())
    saved = payload["history"]
    history = History([tuple(t) for t in saved["train"]], saved["val"])
    return history, payload["config"]


def plot_curves(
    history: History, target: Path, title: str, baseline: tuple[str, float] | None = None
) -> Path:
    """Training loss (raw, faint, and a moving average) and validation loss against step,
    and a ``(label, loss)`` baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # write a file; never open a window
    import matplotlib.pyplot as plt
    import numpy as np

    steps, losses = np.array(history.train, dtype=float).T
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(steps[window - 1 :], smooth, color="tab:blue", label="train")
    if history.val:
        ax.plot(
            [v["step"] for v in history.val],
            [v["loss"] for v in history.val],
            "o-",
            color="tab:orange",
            markersize=3,
            label="validation",
        )
    if baseline is not None:
        label, value = baseline
        ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=label)
    if history.val:
        title = f"{title}: validation loss {history.val[-1]['loss']:.3f}"
    ax.set(xlabel="step", ylabel="loss (nats)", title=title)
    ax.set_yscale("log")
    # Plain numbers on the log axis (0.1, 2, 3 rather than 10^-1, 2x10^0); minor ticks are
    # labelled only when the curves span less than a decade, so labels never pile up.
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(minor_thresholds=(1, 0.4)))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target
