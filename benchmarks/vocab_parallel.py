"""``python -m benchmarks.vocab_parallel [--devices 1 2 4 8] [--vocab 32768 131072]``:
the fused loss with the vocabulary split over forced CPU devices, for docs/scaling.md.

Value and gradient (of hidden, weight) of the mean cross-entropy of
``hidden @ weight`` (``(TOKENS, HIDDEN)`` by ``(HIDDEN, V)``, float32, tokens replicated,
the weight split ``P(None, 'tp')``) by three programs under ``jax.jit``:

* ``vocab-parallel``: :func:`stablelayers.linear_softmax_cross_entropy_sharded`;
* ``optax, sharded logits``: ``optax.softmax_cross_entropy_with_integer_labels`` of the
  materialised ``hidden @ weight`` (the logits stay split as the weight, by GSPMD);
* ``fused, GSPMD``: :func:`stablelayers.linear_softmax_cross_entropy` on the sharded
  weight, left to GSPMD (the issue-25 baseline).

For each: the compiled program's temporaries per device (``memory_analysis()``), its
collectives (count of all-gather / all-reduce / reduce-scatter / all-to-all /
collective-permute, and the largest result shape of each kind, from the HLO text), and the
median time of ``--repeats`` steps after a warm-up. One child process per device count
(XLA's device count is fixed when JAX starts); all the forced devices share this machine's
cores, so times across device counts measure the work and the collectives, not a
speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

TOKENS, HIDDEN = 2048, 256
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(KINDS) + r")(-start)?\(", re.MULTILINE
)
_SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def collectives(hlo: str) -> dict[str, dict[str, object]]:
    """Per kind: how many ops, and the largest result shape (by elements)."""
    out: dict[str, dict[str, object]] = {}
    for m in _OP.finditer(hlo):
        kind = m.group(2)
        shapes = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(m.group(1))]
        entry = out.setdefault(kind, {"count": 0, "largest": ()})
        entry["count"] = int(entry["count"]) + 1  # type: ignore[call-overload]
        for shape in shapes:
            largest = entry["largest"]
            assert isinstance(largest, tuple)
            if _size(shape) > _size(largest):
                entry["largest"] = shape
    return out


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n if shape else 0


def _child(devices: int, vocabs: list[int], repeats: int) -> None:
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import stablelayers as sl

    mesh = Mesh(np.array(jax.devices()[:devices]), ("tp",))
    w_spec, rep = NamedSharding(mesh, P(None, "tp")), NamedSharding(mesh, P())
    rows = []
    for vocab in vocabs:
        k = jax.random.split(jax.random.key(0), 3)
        h = jax.device_put(jax.random.normal(k[0], (TOKENS, HIDDEN)), rep)
        w = jax.device_put(jax.random.normal(k[1], (HIDDEN, vocab)) / 16, w_spec)
        y = jax.device_put(jax.random.randint(k[2], (TOKENS,), 0, vocab), rep)

        def parallel(h, w, y):
            return sl.linear_softmax_cross_entropy_sharded(
                h, w, y, mesh=mesh, axis_name="tp", reduction="mean"
            )

        def materialised(h, w, y):
            return optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()

        def gspmd(h, w, y):
            return sl.linear_softmax_cross_entropy(h, w, y, reduction="mean")

        for name, loss in (
            ("vocab-parallel", parallel),
            ("optax, sharded logits", materialised),
            ("fused, GSPMD", gspmd),
        ):
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            compiled = step.lower(h, w, y).compile()
            mem = compiled.memory_analysis()
            jax.block_until_ready(compiled(h, w, y))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(h, w, y))
                times.append(time.perf_counter() - start)
            rows.append(
                {
                    "devices": devices,
                    "vocab": vocab,
                    "program": name,
                    "temp_bytes": mem.temp_size_in_bytes,
                    "collectives": collectives(compiled.as_text()),
                    "seconds": sorted(times)[len(times) // 2],
                }
            )
    print(json.dumps(rows))


def _collective_cell(c: dict[str, dict[str, object]], vocab: int) -> str:
    parts = []
    for kind in KINDS:
        if kind in c:
            largest = c[kind]["largest"]
            assert isinstance(largest, list | tuple)
            dims = "x".join("**V**" if d == vocab else str(d) for d in largest)
            parts.append(f"{c[kind]['count']} {kind} ({dims})")
    return "; ".join(parts) or "none"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vocab_parallel", description=__doc__
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.vocab, args.repeats)
        return
    loads = [f"{os.getloadavg()[0]:.2f}"]
    rows = []
    for n in args.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "benchmarks.vocab_parallel", "--child", str(n)]
        cmd += ["--repeats", str(args.repeats), "--vocab", *map(str, args.vocab)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])
        loads.append(f"{os.getloadavg()[0]:.2f}")
    one = {
        r["vocab"]: r["temp_bytes"]
        for r in rows
        if r["devices"] == 1 and r["program"] == "fused, GSPMD"
    }
    print(
        f"value and grad of the mean loss, {TOKENS} tokens x hidden {HIDDEN}, float32, "
        f"weight split P(None, 'tp') over forced CPU devices; median of {args.repeats}; "
        f"1-minute load average at start and after each device count: {', '.join(loads)}\n"
    )
    print(
        "| devices | vocab | program | time (s) | temporaries per device (MiB) "
        "| / one-device fused | collectives (count, largest result) |"
    )
    print("|---:|---:|:---|---:|---:|---:|:---|")
    for r in rows:
        mib = r["temp_bytes"] / 2**20
        ratio = r["temp_bytes"] / one[r["vocab"]] if r["vocab"] in one else float("nan")
        print(
            f"| {r['devices']} | {r['vocab']} | {r['program']} | {r['seconds']:.3f} "
            f"| {mib:.1f} | {ratio:.3f} | {_collective_cell(r['collectives'], r['vocab'])} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
