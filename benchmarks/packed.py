"""``python -m benchmarks.packed [--quick] [--out PATH]``: packed sequences and soft-capping.

Value-and-grad of causal attention (batch 1, one head of dim 64, float32) over 8192 tokens
that hold 8 documents of 1024 or 32 of 256, given as segment ids, against the same length
unpacked and against the block-diagonal mask through ``jax.nn.dot_product_attention``;
each with the soft cap off and on; PyTorch's ``scaled_dot_product_attention`` on the
unpacked row for scale. The single-device contenders run interleaved in one process
(medians of rounds); the ring (4 forced CPU devices) runs in a second process. Reported:
the median time, its ratio to the unpacked chunked path, XLA's temporaries, and whether
the compiled program holds any array with two sequence dimensions (``L x L``).

Writes ``docs/packed_benchmarks.md`` (a temp file for ``--quick``) and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.environment import SHARED_PROCESS_ENV, describe, load_average

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAD_DIM = 64
CAP = 50.0  # Gemma 2's attention soft cap
ROUNDS, QUICK_ROUNDS = 5, 2


def _segments(length: int, documents: int):
    import numpy as np

    if documents == 1:
        return None
    return np.repeat(np.arange(1, documents + 1), length // documents)[None].astype(np.int32)


def _inputs(length: int):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (1, length, 1, HEAD_DIM)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))


def _has_two_sequence_dims(hlo: str, length: int) -> bool:
    """Whether any shape in the compiled program has two dimensions of ``length``."""
    return re.search(rf"\b{length},(?:\d+,)*{length}\b", hlo) is not None


def _compiled(attend, q, k, v):
    """The jitted value-and-grad of ``sum(attend(q, k, v))``, its temporaries and whether
    it holds an ``L x L`` array."""
    import jax
    import jax.numpy as jnp

    step = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v)), (0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    two_dims = _has_two_sequence_dims(compiled.as_text(), q.shape[1])
    return (lambda: jax.block_until_ready(compiled(q, k, v))), temp, two_dims


def _packings_and_caps(label: str, attention, length: int, documents: tuple[int, ...]):
    """Compiled causal ``attention`` for each packing in ``documents`` (1: unpacked), with
    the soft cap off and on."""
    q, k, v = _inputs(length)
    cases = {}
    for count in documents:
        ids = _segments(length, count)
        for cap in (None, CAP):
            attend = functools.partial(
                attention, is_causal=True, segment_ids=ids, logits_soft_cap=cap
            )
            name = f"{label}, {count} x {length // count}" + (", cap" if cap else "")
            cases[name] = _compiled(attend, q, k, v)
    return cases


def _single_device_cases(length: int, small_docs: int, large_docs: int):
    import jax
    import jax.numpy as jnp

    import stablelayers as sl

    q, k, v = _inputs(length)
    chunked = functools.partial(sl.dot_product_attention, implementation="chunked")
    cases = _packings_and_caps("chunked", chunked, length, (1, large_docs, small_docs))
    ids = jnp.asarray(_segments(length, large_docs))
    mask = (ids[:, :, None] == ids[:, None, :])[:, None]

    def masked(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)

    cases[f"jax.nn, block-diagonal mask, {large_docs} x {length // large_docs}"] = _compiled(
        masked, q, k, v
    )
    cases.update(_torch_cases(length))
    return cases


def _torch_cases(length: int):
    try:
        import torch
    except ImportError:
        return {}
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (1, 1, length, HEAD_DIM)
    q, k, v = (
        torch.tensor(rng.standard_normal(shape, np.float32), requires_grad=True)
        for _ in range(3)
    )
    default_threads = torch.get_num_threads()

    def run(threads: int):
        torch.set_num_threads(threads)
        for x in (q, k, v):
            x.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
        torch.set_num_threads(default_threads)

    return {
        "torch sdpa, unpacked": ((lambda: run(default_threads)), None, None),
        "torch sdpa 1 thread, unpacked": ((lambda: run(1)), None, None),
    }


def _ring_cases(length: int, large_docs: int):
    import jax
    import numpy as np
    from jax.sharding import Mesh

    import stablelayers as sl

    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    ring = functools.partial(sl.ring_attention_sharded, mesh=mesh, axis_name="seq")
    return _packings_and_caps("ring (4 devices)", ring, length, (1, large_docs))


def _time(cases: dict, rounds: int) -> list[dict]:
    """Each case once per round, interleaved; the first (compiling, warming) call apart."""
    for run, _, _ in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (run, _, _) in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return [
        {
            "case": name,
            "ms": 1e3 * statistics.median(times[name]),
            "temp_mib": None if temp is None else temp / 2**20,
            "two_sequence_dims": two_dims,
        }
        for name, (_, temp, two_dims) in cases.items()
    ]


def child_main(kind: str, length: int, rounds: int) -> list[dict]:
    small, large = (32, 8) if length >= 8192 else (8, 2)
    if kind == "ring":
        return _time(_ring_cases(length, large), rounds)
    return _time(_single_device_cases(length, small, large), rounds)


def _run_child(kind: str, length: int, rounds: int) -> list[dict]:
    env = {**os.environ, **SHARED_PROCESS_ENV, "JAX_PLATFORMS": "cpu"}
    if kind == "ring":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.packed", "--child", kind, str(length), str(rounds)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {kind} benchmark failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(results: list[dict], info: dict[str, str], length: int, quick: bool) -> str:
    base = {r["case"]: r["ms"] for r in results}
    lines = [
        "# Packed sequences and soft-capping",
        "",
        "Written by `python -m benchmarks.packed`; do not edit by hand."
        + (" Quick run: not for comparison." if quick else ""),
        "",
        f"Value-and-grad of causal attention over {length} tokens, batch 1, one head of "
        f"dim 64, float32. `a x b`: `a` documents of `b` tokens in the row, as segment "
        f"ids (`1 x {length}` is unpacked); `cap`: `logits_soft_cap={CAP}`. Medians of "
        "interleaved rounds; ratios to the unpacked chunked path (the ring's to the "
        "unpacked ring). *L x L* says whether the compiled program holds any array with "
        "two sequence dimensions.",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        "| case | time (ms) | ratio | XLA temporaries (MiB) | L x L array |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        ref = "ring (4 devices), 1 x" if r["case"].startswith("ring") else "chunked, 1 x"
        ref_ms = next(
            ms for case, ms in base.items() if case.startswith(ref) and "cap" not in case
        )
        temp = "" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
        two = (
            ""
            if r["two_sequence_dims"] is None
            else ("yes" if r["two_sequence_dims"] else "no")
        )
        lines.append(
            f"| {r['case']} | {r['ms']:.0f} | {r['ms'] / ref_ms:.2f} | {temp} | {two} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        kind, length, rounds = argv[1], int(argv[2]), int(argv[3])
        print(json.dumps(child_main(kind, length, rounds)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 rounds")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    length, rounds = (512, QUICK_ROUNDS) if args.quick else (8192, ROUNDS)
    before = load_average()
    results = _run_child("single", length, rounds) + _run_child("ring", length, rounds)
    info = describe()
    info["load average (1 min) before / after"] = f"{before} / {load_average()}"
    text = render(results, info, length, args.quick)
    out = args.out
    if out is None:
        out = (
            pathlib.Path(tempfile.gettempdir()) / "packed_benchmarks.md"
            if args.quick
            else REPO_ROOT / "docs" / "packed_benchmarks.md"
        )
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
