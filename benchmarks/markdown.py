"""Number formats and Markdown tables, shared by every section of the report."""

from __future__ import annotations

MIB = 2**20
DASH = "\N{EN DASH}"  # ranges as "[min, en dash, max]", the typographic convention


def shape_label(shape: tuple[int, ...]) -> str:
    """``(64, 1024, 1024)`` -> ``64x1024x1024``."""
    return "x".join(map(str, shape))


def fmt_ms(value: float) -> str:
    """Three significant digits: timings on a shared machine hold no more."""
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def fmt_ulp(value: float) -> str:
    """``3.51``, ``65``, ``1.6e7``: small errors to the hundredth, large ones by magnitude."""
    if value < 10:
        return f"{value:.2f}"
    if value < 1e4:
        return f"{value:.0f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt_bytes(value: int | None, x_bytes: int) -> str:
    """MiB, and the same in arrays the size of x (the unit the issue's targets use)."""
    if value is None:
        return "n/a"
    return f"{value / MIB:.4g} MiB ({value / x_bytes:.2f} x)"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
