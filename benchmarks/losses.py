"""Loss table: value-and-grad of the mean fused linear cross-entropy against the
materialised losses (stablelayers, optax on jax.nn logits) and, when torch is installed,
torch's ``F.linear_cross_entropy`` and ``F.cross_entropy``: XLA temporaries, peak memory and
wall time.

    python -m benchmarks.losses [--vocab 32768 131072] [--dtype float32 bfloat16] [--reps 3]
        [--cases fused optax ...]

Cases: ``fused`` (``linear_softmax_cross_entropy(..., reduction='mean')``), ``fused-none``
(the per-token loss, then ``jnp.mean``: one product more), ``stablelayers`` and ``optax``
(float32 logits ``hidden @ weight``, then the loss), ``torch-fused`` and ``torch``;
``fused-cap`` and ``fused-none-cap`` are the first two with ``logits_soft_cap=30.0``
(Gemma 2's final-logit soft-capping; not run unless named). Each
case runs in its own process (a fresh heap and XLA client); the table is written to
docs/loss_benchmarks.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOKENS, HIDDEN = 8192, 512
CASES = ("fused", "stablelayers", "optax", "torch-fused", "torch")
SOFT_CAP = 30.0  # Gemma 2's final-logit cap, for the ``-cap`` cases
OUT = Path(__file__).resolve().parent.parent / "docs" / "loss_benchmarks.md"


def _loss(case: str, chunk: int | None):
    import jax.numpy as jnp
    import optax

    import stablelayers as sl

    base, capped = case.removesuffix("-cap"), case.endswith("-cap")
    options = {"chunk_size": chunk, "logits_soft_cap": SOFT_CAP if capped else None}

    def loss(h, w, y):
        if base == "fused":
            return sl.linear_softmax_cross_entropy(h, w, y, reduction="mean", **options)
        if base == "fused-none":
            per_token = sl.linear_softmax_cross_entropy(h, w, y, **options)
        elif case == "stablelayers":
            logits = jnp.matmul(h, w, preferred_element_type=jnp.float32)
            per_token = sl.softmax_cross_entropy(logits, y)
        else:
            logits = jnp.matmul(h, w, preferred_element_type=jnp.float32)
            per_token = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(per_token)

    return loss


def _peak_mib() -> float:
    """The process's resident high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jax_step(case: str, vocab: int, dtype: str, chunk: int | None):
    import jax

    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (TOKENS, HIDDEN), dtype)
    w = (jax.random.normal(k[1], (HIDDEN, vocab)) / HIDDEN**0.5).astype(dtype)
    y = jax.random.randint(k[2], (TOKENS,), 0, vocab)
    step = jax.jit(jax.value_and_grad(_loss(case, chunk), argnums=(0, 1)))
    compiled = step.lower(h, w, y).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return (lambda: jax.block_until_ready(compiled(h, w, y))), temp


def _torch_step(case: str, vocab: int, dtype: str):
    """torch's losses on the same problem: ``weight`` is ``(vocab, hidden)`` there (the
    layout of ``nn.Linear``), and the logits of ``torch`` are float32 as above."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    kind = getattr(torch, dtype)
    h = torch.randn(TOKENS, HIDDEN, generator=gen).to(kind).requires_grad_()
    w = (torch.randn(vocab, HIDDEN, generator=gen) / HIDDEN**0.5).to(kind).requires_grad_()
    y = torch.randint(0, vocab, (TOKENS,), generator=gen)

    def run():
        h.grad = w.grad = None
        if case == "torch-fused":
            # options=None would be the materialising reference path.
            options = torch.nn.LinearCrossEntropyOptions()
            loss = F.linear_cross_entropy(h, w, y, reduction="mean", options=options)
        else:
            loss = F.cross_entropy((h @ w.T).float(), y, reduction="mean")
        loss.backward()

    return run, None


def run_case(case: str, vocab: int, dtype: str, reps: int, chunk: int | None) -> dict:
    """One case in this process: build (compile), read the temporaries, time ``reps``
    runs after a warm-up run (wall and process CPU time: the CPU seconds are the steadier
    figure on a shared machine); peak memory is the resident high-water mark above the
    one once the runtime is up."""
    if case.startswith("torch"):
        import torch

        torch.zeros(1)
    else:
        import jax.numpy as jnp

        jnp.zeros(1).block_until_ready()
    baseline = _peak_mib()
    if case.startswith("torch"):
        run, temp = _torch_step(case, vocab, dtype)
    else:
        run, temp = _jax_step(case, vocab, dtype, chunk)
    run()
    times, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = _peak_mib() - baseline
    return {
        "case": case,
        "vocab": vocab,
        "dtype": dtype,
        "temp_bytes": temp,
        "peak_mib": peak,
        "seconds": statistics.median(times),
        "times": times,
        "cpu_seconds": statistics.median(cpu),
        "reps": reps,
        "chunk": chunk,
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| vocab | dtype | loss | XLA temporaries (MiB) | vs optax | peak RSS (MiB) | "
        "time (s) | vs optax | CPU time (s) | vs optax | load |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
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
        temp = row["temp_bytes"]
        mem, rel_mem = "-", "-"
        if temp is not None:
            mem = f"{temp / 2**20:.0f}"
            rel_mem = f"{temp / base['temp_bytes']:.3f}" if base else "-"
        rel_t = f"{row['seconds'] / base['seconds']:.2f}" if base else "-"
        rel_c = f"{row['cpu_seconds'] / base['cpu_seconds']:.2f}" if base else "-"
        lines.append(
            f"| {row['vocab']} | {row['dtype']} | {row['case']} | {mem} | {rel_mem} | "
            f"{row['peak_mib']:.0f} | {row['seconds']:.2f} | {rel_t} | "
            f"{row['cpu_seconds']:.2f} | {rel_c} | {row['load']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    torch = importlib.util.find_spec("torch") is not None
    cases = [c for c in CASES if torch or not c.startswith("torch")]
    parser.add_argument("--cases", nargs="+", default=cases)
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
                load = os.getloadavg()[0]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                # The 1-minute load average before and after the case: the machine may
                # be shared, and wall times are only comparable at similar load.
                rows.append({**row, "load": max(load, os.getloadavg()[0])})
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
            f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
            f"{platform.processor() or platform.machine()} "
            f"({platform.platform()}), `{command}`.\n\n" + table + "\n"
        )


if __name__ == "__main__":
    main()
