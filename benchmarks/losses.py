"""Loss table: value-and-grad of the fused linear cross-entropy against the materialised
losses (stablelayers, optax on jax.nn logits), XLA temporaries and wall time.

    python -m benchmarks.losses [--vocab 32768 131072] [--dtype float32 bfloat16] [--reps 3]

Each case runs in its own process (a fresh heap and XLA client), and the table is written
to docs/loss_benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOKENS, HIDDEN = 8192, 512
CASES = ("fused", "stablelayers", "optax")
OUT = Path(__file__).resolve().parent.parent / "docs" / "loss_benchmarks.md"


def _loss(case: str, chunk: int | None):
    import jax.numpy as jnp
    import optax

    import stablelayers as sl

    def loss(h, w, y):
        if case == "fused":
            per_token = sl.linear_softmax_cross_entropy(h, w, y, chunk_size=chunk)
        elif case == "stablelayers":
            logits = jnp.matmul(h, w, preferred_element_type=jnp.float32)
            per_token = sl.softmax_cross_entropy(logits, y)
        else:
            logits = jnp.matmul(h, w, preferred_element_type=jnp.float32)
            per_token = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(per_token)

    return loss


def run_case(case: str, vocab: int, dtype: str, reps: int, chunk: int | None) -> dict:
    """One case in this process: compile, read the temporaries, time ``reps`` runs."""
    import jax

    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (TOKENS, HIDDEN), dtype)
    w = (jax.random.normal(k[1], (HIDDEN, vocab)) / HIDDEN**0.5).astype(dtype)
    y = jax.random.randint(k[2], (TOKENS,), 0, vocab)
    step = jax.jit(jax.value_and_grad(_loss(case, chunk), argnums=(0, 1)))
    compiled = step.lower(h, w, y).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(h, w, y))
        times.append(time.perf_counter() - start)
    return {
        "case": case,
        "vocab": vocab,
        "dtype": dtype,
        "temp_bytes": temp,
        "seconds": statistics.median(times),
        "reps": reps,
        "chunk": chunk,
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| vocab | dtype | loss | XLA temporaries (MiB) | vs optax | time (s) | vs optax |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if r["case"] == "optax"
                and r["vocab"] == row["vocab"]
                and r["dtype"] == row["dtype"]
            ),
            None,
        )
        mem = row["temp_bytes"] / 2**20
        rel_mem = f"{row['temp_bytes'] / base['temp_bytes']:.3f}" if base else "-"
        rel_t = f"{row['seconds'] / base['seconds']:.2f}" if base else "-"
        lines.append(
            f"| {row['vocab']} | {row['dtype']} | {row['case']} | {mem:.0f} | {rel_mem} | "
            f"{row['seconds']:.2f} | {rel_t} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--one", nargs=3, metavar=("CASE", "VOCAB", "DTYPE"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.one:
        case, vocab, dtype = args.one
        print(json.dumps(run_case(case, int(vocab), dtype, args.reps, args.chunk)))
        return
    rows = []
    for vocab in args.vocab:
        for dtype in args.dtype:
            for case in args.cases:
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.losses",
                    "--one",
                    case,
                    str(vocab),
                    dtype,
                    "--reps",
                    str(args.reps),
                ]
                if args.chunk:
                    cmd += ["--chunk", str(args.chunk)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    table = _table(rows)
    print(table)
    if not args.no_write:
        command = "python -m benchmarks.losses " + " ".join(sys.argv[1:])
        OUT.write_text(
            "# Loss benchmarks\n\n"
            f"Value-and-grad (with respect to hidden and weight) of the mean per-token loss, "
            f"{TOKENS} tokens, hidden {HIDDEN}; XLA temporaries from "
            "`jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes`, "
            "time the median of the runs after compilation, each case in its own process.\n\n"
            f"Run {datetime.date.today()} on {platform.processor() or platform.machine()} "
            f"({platform.platform()}), `{command}`.\n\n" + table + "\n"
        )


if __name__ == "__main__":
    main()
