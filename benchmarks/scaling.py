"""``python -m benchmarks.scaling [--devices 4 8] [--lengths 8192 ...] [--time-up-to N]``:
context parallelism on forced CPU devices, for docs/scaling.md.

For each device count (a child process per count, since XLA's device count is fixed when
JAX starts) and sequence length: causal self-attention, value and gradient of query, key
and value, through :func:`stablelayers.ring_attention` inside ``shard_map`` on data already
in the zigzag layout; and the one-device chunked path
(``dot_product_attention(implementation="chunked")``) as the baseline. Memory per device
is the compiled program's ``memory_analysis()`` (arguments + outputs + temporaries); time
is the median of 3 runs after a warm-up, measured only up to ``--time-up-to`` tokens. The
program's HLO is also searched for any array with a dimension of the whole length, which
would mean a device holds the whole key or value.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BATCH, HEADS, HEAD_DIM = 1, 4, 64


def _child(devices: int, lengths: list[int], time_up_to: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import stablelayers as sl

    rows = []
    for length in lengths:
        shape = (BATCH, length, HEADS, HEAD_DIM)
        args = [jax.ShapeDtypeStruct(shape, jnp.float32) for _ in range(3)]
        if devices == 1:

            def attend(q, k, v):
                return sl.dot_product_attention(
                    q, k, v, is_causal=True, implementation="chunked"
                )

            shardings = None
        else:
            mesh = Mesh(np.array(jax.devices()[:devices]), ("seq",))
            spec = P(None, "seq")

            def local(q, k, v):
                return sl.ring_attention(
                    q, k, v, axis_name="seq", is_causal=True, layout="zigzag"
                )

            attend = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
            shardings = NamedSharding(mesh, spec)
        step = jax.jit(
            jax.value_and_grad(
                lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)
            ),
            in_shardings=None if shardings is None else (shardings,) * 3,
        )
        compiled = step.lower(*args).compile()
        mem = compiled.memory_analysis()
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        hlo = compiled.as_text()
        whole = devices > 1 and (f",{length}," in hlo or f"[{BATCH},{length}," in hlo)
        seconds = None
        if length <= time_up_to:
            key = jax.random.split(jax.random.key(0), 3)
            xs = [jax.random.normal(k, shape) for k in key]
            if shardings is not None:
                xs = [jax.device_put(x, shardings) for x in xs]
            jax.block_until_ready(compiled(*xs))
            times = []
            for _ in range(3):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*xs))
                times.append(time.perf_counter() - start)
            seconds = sorted(times)[1]
        rows.append(
            {
                "devices": devices,
                "length": length,
                "bytes_per_device": total,
                "seconds": seconds,
                "whole_length_array": whole,
            }
        )
    print(json.dumps(rows))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--time-up-to", type=int, default=16384, help="longest length timed")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.lengths, args.time_up_to)
        return
    rows = []
    for n in [1, *args.devices]:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={max(n, 1)}")
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--child", str(n), "--lengths"]
        cmd += [str(length) for length in args.lengths] + ["--time-up-to", str(args.time_up_to)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    base = {r["length"]: r["bytes_per_device"] for r in rows if r["devices"] == 1}
    print(f"causal self-attention, value and grad; batch {BATCH}, {HEADS} heads, head_dim")
    print(f"{HEAD_DIM}, float32, CPU devices forced with XLA_FLAGS\n")
    print("| devices | tokens | time (s) | memory per device (MiB) | vs 1 device | whole L? |")
    print("|---:|---:|---:|---:|---:|:---|")
    for r in rows:
        t = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        mib = r["bytes_per_device"] / 2**20
        ratio = r["bytes_per_device"] / base[r["length"]]
        whole = "yes" if r["whole_length_array"] else "no"
        print(f"| {r['devices']} | {r['length']} | {t} | {mib:.1f} | {ratio:.3f} | {whole} |")


if __name__ == "__main__":
    main(sys.argv[1:])
