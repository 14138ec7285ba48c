"""``python -m benchmarks.pure_jax_cost [--quick] [--out PATH]``: the pure-JAX path (the
one GPUs and TPUs run) against jax.nn on the CPU, with the kernels off: XLA's
``cost_analysis()['bytes accessed']`` of each compiled program and its median time, for
the forward pass and value-and-grad of each op.

Each XLA:CPU fusion setting runs in its own process (``XLA_FLAGS`` is read once, when jax
starts): XLA's own loop and reduction fusion, the closest proxy here for its GPU
fusion, and the default, which also hands plain-arithmetic graphs (jax.nn's, never
stablelayers', whose masks need compares and selects) to the YNNPACK library. Writes
``docs/pure_jax_benchmarks.md`` (a temp file for ``--quick``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.environment import MALLOC_ENV, describe, load_average

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {
    "XLA fusion (YNNPACK off)": "--xla_cpu_experimental_ynn_fusion_type=",
    "XLA:CPU default (YNNPACK on)": "",
}
OPS = ("softmax", "log_softmax", "logsumexp", "softplus", "sigmoid")
SHAPE, QUICK_SHAPE = (4096, 4096), (256, 256)
RUNS, QUICK_RUNS = 21, 3


def _child(shape: tuple[int, int], runs: int) -> None:
    import jax
    import numpy as np

    import stablelayers as sl

    pairs = {
        "softmax": (sl.softmax, jax.nn.softmax),
        "log_softmax": (sl.log_softmax, jax.nn.log_softmax),
        "logsumexp": (
            lambda x: sl.logsumexp(x, axis=-1),
            lambda x: jax.nn.logsumexp(x, axis=-1),
        ),
        "softplus": (sl.softplus, jax.nn.softplus),
        "sigmoid": (sl.sigmoid, jax.nn.sigmoid),
    }
    x = jax.random.normal(jax.random.key(0), shape) * 3
    g = jax.random.normal(jax.random.key(1), shape)

    def value_and_grad(f):  # type: ignore[no-untyped-def]
        def run(x, g):  # type: ignore[no-untyped-def]
            y, vjp = jax.vjp(f, x)
            return y, vjp(g if y.shape == g.shape else g[..., 0])[0]

        return run

    for op in OPS:
        for mode in ("forward", "value_and_grad"):
            args = (x,) if mode == "forward" else (x, g)
            compiled = []
            for f in pairs[op]:
                program = f if mode == "forward" else value_and_grad(f)
                compiled.append(jax.jit(program).lower(*args).compile())
            times: list[list[float]] = [[], []]
            for _ in range(runs):  # interleaved, so load hits both alike
                for i, c in enumerate(compiled):
                    start = time.perf_counter()
                    jax.block_until_ready(c(*args))
                    times[i].append(time.perf_counter() - start)
            row = {"op": op, "mode": mode}
            for name, c, t in zip(("ours", "jax.nn"), compiled, times, strict=True):
                row[f"{name} MiB"] = c.cost_analysis()["bytes accessed"] / 2**20
                row[f"{name} ms"] = float(np.median(t[1:])) * 1e3
            print(json.dumps(row), flush=True)


def _run_setting(flags: str, quick: bool) -> list[dict]:
    env = {**os.environ, **MALLOC_ENV, "STABLELAYERS_CPU_KERNELS": "0", "XLA_FLAGS": flags}
    cmd = [sys.executable, "-m", "benchmarks.pure_jax_cost", "--child"]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _table(rows: list[dict]) -> str:
    lines = [
        "| op | pass | bytes accessed: stablelayers / jax.nn (MiB) | ratio "
        "| time: stablelayers / jax.nn (ms) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bytes_ratio = r["ours MiB"] / r["jax.nn MiB"]
        time_ratio = r["ours ms"] / r["jax.nn ms"]
        lines.append(
            f"| `{r['op']}` | {r['mode']} | {r['ours MiB']:.0f} / {r['jax.nn MiB']:.0f} "
            f"| {bytes_ratio:.2f} | {r['ours ms']:.1f} / {r['jax.nn ms']:.1f} "
            f"| {time_ratio:.2f} |"
        )
    return "\n".join(lines)


def _verdict(rows: list[dict]) -> str:
    """Which rows meet the targets, in words."""
    over_bytes = [f"{r['op']} {r['mode']}" for r in rows if r["ours MiB"] > r["jax.nn MiB"]]
    slow = [
        f"{r['op']} {r['mode']} ({r['ours ms'] / r['jax.nn ms']:.2f}x)"
        for r in rows
        if r["ours ms"] > 1.1 * r["jax.nn ms"]
    ]
    bytes_line = (
        "Bytes accessed at most jax.nn's: met for every op and pass."
        if not over_bytes
        else "Bytes accessed at most jax.nn's: missed for " + ", ".join(over_bytes) + "."
    )
    time_line = (
        "Time at most 1.1x jax.nn's: met for every op and pass."
        if not slow
        else "Time at most 1.1x jax.nn's: missed for " + ", ".join(slow) + "."
    )
    return f"{bytes_line} {time_line}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pure_jax_cost")
    parser.add_argument("--quick", action="store_true", help="tiny shape: a smoke test")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(QUICK_SHAPE if args.quick else SHAPE, QUICK_RUNS if args.quick else RUNS)
        return
    info = describe()
    load_at_start = load_average()
    sections = [(title, _run_setting(flags, args.quick)) for title, flags in SETTINGS.items()]
    shape = QUICK_SHAPE if args.quick else SHAPE
    header = [
        "# The pure-JAX path against jax.nn: memory traffic and time",
        "",
        "Written by `python -m benchmarks.pure_jax_cost`. The pure-JAX path is what GPUs and",
        "TPUs run; here it is traced on the CPU with `STABLELAYERS_CPU_KERNELS=0`. Float32,",
        f"{shape[0]} x {shape[1]}, rows along the last axis; `bytes accessed` is XLA's cost",
        "model of the compiled program (every fusion's operands and results), time the",
        "median of interleaved runs. Value-and-grad is `jax.vjp` and one cotangent.",
        "",
        f"Machine: {info.get('machine', '?')}; jax {info.get('jax', '?')};"
        f" {info.get('date', '')}; load average {load_at_start} at start,"
        f" {load_average()} at end.",
        "",
    ]
    body = []
    for title, rows in sections:
        body += [f"## {title}", "", _verdict(rows), "", _table(rows), ""]
    body += [
        "## Reading the tables",
        "",
        "Issue 24 asks for bytes accessed at most jax.nn's and time at most 1.1x jax.nn's,",
        "with the kernels off, as the closest proxy here for XLA's GPU fusion. That proxy is",
        "the first table: XLA's own fusion. The default XLA:CPU also hands graphs of plain",
        "arithmetic to YNNPACK, which runs jax.nn's softmax in one pass; stablelayers' graphs",
        "hold the compares and selects that its semantics need (masks, -inf and +inf rows,",
        "NaN rows), which YNNPACK does not take, so they stay with XLA's fusion there too.",
        "",
        "The row ops' time goes to their row sums: one variadic `reduce` with TwoSum as its",
        "operator, which fuses the `exp` into the reduction (no temporary is written) but",
        "which XLA:CPU emits as a scalar loop, where jax.nn's plain sum is vectorised after",
        "writing its terms to memory. On a GPU both are parallel row reductions; no GPU has",
        "measured it yet (see the accelerator benchmarks).",
        "",
    ]
    page = "\n".join(header + body)
    out = args.out
    if out is None:
        out = (
            pathlib.Path(tempfile.mkdtemp()) / "pure_jax_benchmarks.md"
            if args.quick
            else REPO_ROOT / "docs" / "pure_jax_benchmarks.md"
        )
    out.write_text(page)
    print(page)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
