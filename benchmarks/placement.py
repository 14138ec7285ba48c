"""``python -m benchmarks.placement [--quick]``: how much one op's time depends on where its
input sits in memory.

Times jitted ``stablelayers.softplus`` and ``jax.nn.softplus`` on copies of the same 4096x4096
float32 x at different addresses, each copy alone, and prints the median per copy and the
spread (slowest copy over fastest). The main harness cycles through copies because of it.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.environment import ensure_process_env

COPIES = 8


def main(argv: list[str]) -> None:
    ensure_process_env(argv, "benchmarks.placement")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.placement")
    parser.add_argument("--quick", action="store_true", help="a 256x1024 x, 3 runs a copy")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import stablelayers as sl

    shape, runs = ((256, 1024), 3) if args.quick else ((4096, 4096), 9)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    ops = {"stablelayers": sl.softplus, "jax.nn": jax.nn.softplus}
    compiled = {name: jax.jit(op).lower(x).compile() for name, op in ops.items()}
    # A small allocation of a different size before each copy moves it along.
    copies = [(jnp.zeros(1 + 300 * i), jnp.array(x, copy=True)) for i in range(COPIES)]
    medians: dict[str, list[float]] = {name: [] for name in ops}
    print(f"softplus, {shape}, median ms of {runs} runs per copy of x")
    print("copy  address % 4096  " + "  ".join(f"{name:>12}" for name in ops))
    for index, (_, copy) in enumerate(copies):
        row = []
        for name, call in compiled.items():
            jax.block_until_ready(call(copy))
            times = []
            for _ in range(runs):
                begin = time.perf_counter()
                jax.block_until_ready(call(copy))
                times.append((time.perf_counter() - begin) * 1e3)
            medians[name].append(float(np.median(times)))
            row.append(f"{medians[name][-1]:12.2f}")
        address = copy.unsafe_buffer_pointer() % 4096
        print(f"{index:4d}  {address:14d}  " + "  ".join(row))
    for name, values in medians.items():
        low, high = min(values), max(values)
        print(f"{name}: {low:.2f} to {high:.2f} ms, {high / low:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
