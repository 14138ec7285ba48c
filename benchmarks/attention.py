"""``python -m benchmarks.attention [--quick] [--out PATH]``: value-and-grad of causal
attention (batch 1, head dim 64, float32) at long context, each measurement in its own
process: time and peak memory of stablelayers' dense and chunked paths,
``jax.nn.dot_product_attention`` and PyTorch's ``scaled_dot_product_attention``.

Writes ``docs/attention_benchmarks.md`` (a temp file for ``--quick``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks.environment import MALLOC_ENV, describe, load_average

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("chunked", "dense", "jax.nn", "torch", "torch 1 thread")
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (256,)
HEADS = (1, 8)
HEAD_DIM = 64
# Paths that materialise the (heads, L, L) float32 logits peaked at 6x (jax.nn) and 9x
# (dense) their size at 8192 tokens; past this estimate they are not attempted.
MATERIALISED_LIMIT = 10 * 2**30
MATERIALISED_COPIES = 10
# Stop repeating once the timed runs took this long (the first, compiling call excluded).
TIME_BUDGET_S = 20.0
MAX_REPEATS = 5


def _materialises(implementation: str) -> bool:
    return implementation in ("dense", "jax.nn")


def _jax_step(implementation: str, length: int, heads: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import stablelayers as sl

    shape = (1, length, heads, HEAD_DIM)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
    if implementation == "jax.nn":

        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:

        def attend(q, k, v):
            return sl.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes

    def run():
        jax.block_until_ready(compiled(q, k, v))

    return run, temp


def _torch_step(length: int, heads: int, threads: int | None):
    import numpy as np
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    shape = (1, heads, length, HEAD_DIM)  # torch's layout
    q, k, v = (
        torch.tensor(rng.standard_normal(shape, np.float32), requires_grad=True)
        for _ in range(3)
    )

    def run():
        for x in (q, k, v):
            x.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()

    return run, None


def _resident_mib() -> float:
    """The process's resident memory now (``ru_maxrss`` is only the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def child_main(implementation: str, length: int, heads: int) -> dict:
    """Measure one configuration in this process; return the result as a dict."""
    if implementation.startswith("torch"):
        import torch

        torch.zeros(1)  # the runtime is up before the baseline is read, as for jax
    else:
        import jax.numpy as jnp

        jnp.zeros(1).block_until_ready()
    baseline = _resident_mib()
    if implementation.startswith("torch"):
        run, temp = _torch_step(
            length, heads, 1 if implementation == "torch 1 thread" else None
        )
    else:
        run, temp = _jax_step(implementation, length, heads)
    start = time.perf_counter()
    run()  # warm-up: first-call allocations (and, for jax, nothing left to compile)
    first = time.perf_counter() - start
    times = []
    while len(times) < MAX_REPEATS and (first + sum(times) < TIME_BUDGET_S or not times):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "status": "ok",
        "time_ms": 1e3 * times[len(times) // 2],
        "runs": len(times),
        "peak_mib": peak_kib / 1024,
        "baseline_mib": baseline,
        "temp_mib": None if temp is None else temp / 2**20,
    }


def measure(implementation: str, length: int, heads: int, timeout: float) -> dict:
    """One configuration in a fresh process (so its peak memory is its own)."""
    logits_bytes = 4 * heads * length**2
    if (
        _materialises(implementation)
        and MATERIALISED_COPIES * logits_bytes > MATERIALISED_LIMIT
    ):
        return {"status": "skipped (L x L logits exceed memory)"}
    if implementation.startswith("torch"):
        try:
            import torch  # noqa: F401
        except ImportError:
            return {"status": "torch not installed"}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.attention",
        "--child",
        json.dumps([implementation, length, heads]),
    ]
    env = {**os.environ, **MALLOC_ENV}
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timed out ({timeout:.0f} s)"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
        return {"status": f"failed (exit {proc.returncode}: {last})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(result: dict) -> tuple[str, str, str, str]:
    if result["status"] != "ok":
        return result["status"], "", "", ""
    temp = "" if result["temp_mib"] is None else f"{result['temp_mib']:,.0f}"
    above = result["peak_mib"] - result["baseline_mib"]
    return f"{result['time_ms']:,.0f}", f"{result['peak_mib']:,.0f}", f"{above:,.0f}", temp


def render(results: list[dict], info: dict[str, str], quick: bool) -> str:
    lines = ["# Attention benchmarks", ""]
    if quick:
        lines += ["**Quick run: tiny shapes, not figures to quote.**", ""]
    lines += [
        "Value-and-grad of `sum(attention(q, k, v))` with respect to q, k and v: causal, "
        f"batch 1, head dim {HEAD_DIM}, float32, each row measured in its own process. "
        "Time is the median of up to 5 runs after a warm-up call; peak is the process's "
        "peak resident memory (`ru_maxrss`, imports and inputs included), and above "
        "baseline is that peak less the resident memory once the framework's runtime is up "
        "(after importing it and one tiny op), before the inputs are made: for jax it "
        "includes compiling the step. XLA temp is the "
        "compiled step's temporary buffers (`memory_analysis().temp_size_in_bytes`). "
        "`dense` and `chunked` are `stablelayers.dot_product_attention(..., "
        "implementation=...)`; `jax.nn` is `jax.nn.dot_product_attention` (XLA "
        "implementation); `torch` is `torch.nn.functional.scaled_dot_product_attention` "
        "with its default threads (one per core), `torch 1 thread` the same after "
        "`torch.set_num_threads(1)`. XLA ran these steps on one core (measured: process CPU "
        "time equals wall time, even for one large matmul), so `torch 1 thread` is the "
        "like-for-like row; on a loaded machine torch's default threads can also be far "
        "slower than one thread, when its OpenMP workers wait on a busy core.",
        "",
        "Regenerate with `python -m benchmarks.attention`.",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [
        "",
        "| length | heads | implementation | time (ms) | peak memory (MiB) "
        "| above baseline (MiB) | XLA temp (MiB) |",
        "|---:|---:|:---|---:|---:|---:|---:|",
    ]
    for r in results:
        time_ms, peak, above, temp = _cell(r)
        lines.append(
            f"| {r['length']} | {r['heads']} | {r['implementation']} | {time_ms} | {peak} | "
            f"{above} | {temp} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny lengths: a smoke test")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="the Markdown file")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--heads", type=int, nargs="*", default=None)
    parser.add_argument("--implementations", nargs="*", default=None)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        implementation, length, heads = json.loads(args.child)
        print(json.dumps(child_main(implementation, length, heads)))
        return

    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    heads_list = args.heads or ((1,) if args.quick else HEADS)
    implementations = args.implementations or IMPLEMENTATIONS
    out = args.out
    if out is None:
        out = (
            pathlib.Path(tempfile.mkdtemp()) / "attention_benchmarks.md"
            if args.quick
            else REPO_ROOT / "docs" / "attention_benchmarks.md"
        )
    load_at_start = load_average()
    results = []
    for heads in heads_list:
        for length in lengths:
            for implementation in implementations:
                result = measure(implementation, length, heads, args.timeout)
                result.update(length=length, heads=heads, implementation=implementation)
                print(json.dumps(result), flush=True)
                results.append(result)
    info = describe()
    info["load average"] = f"{load_at_start} at start, {load_average()} at end"
    text = render(results, info, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
