"""``python -m benchmarks.accelerator [--quick] [--out PATH]``: stablelayers on a GPU or
TPU against jax.nn, optax and the device's own bandwidth, in one command.

Three sections, each in its own process (the fused loss, one process per contender):

- ops: forward and value-and-grad of softmax, log_softmax, logsumexp, softplus, sigmoid and
  log_sigmoid against jax.nn's at 8192 x 32768, float32 and bfloat16, each as a multiple
  of a copy timed alongside, with XLA's ``bytes accessed`` for both programs;
- attention: causal, 4096 / 16384 / 32768 tokens, 8 heads, head dim 128, bfloat16:
  stablelayers' chunked, dense and cudnn implementations against jax.nn's xla and cudnn,
  forward and value-and-grad;
- loss: ``linear_softmax_cross_entropy`` against optax on materialised logits, 8192 tokens
  x 4096 hidden x 131072 vocabulary, bfloat16: time and peak device memory.

A contender that cannot run (cuDNN off an NVIDIA GPU, a program larger than the free device
memory, a failure) reads ``n/a (why)``; a section that runs out of its share of the time
allowance (7.5 minutes in all, compilation included, sized for one H100) reports the rest
as not run. Writes ``docs/accelerator_benchmarks.md`` (``--quick``: tiny shapes, into a temp
file unless ``--out``) and prints it.
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

from benchmarks.accelerator_common import Deadline, device_record, emit, shapes
from benchmarks.environment import MALLOC_ENV, describe, load_average

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Seconds for the whole run, and each section's share of what is left when it starts (so a
# section that finishes early hands its time on). Sized so that one H100 finishes within 8
# minutes, compilation and process start-up included.
ALLOWANCE_S = {False: 450.0, True: 50.0}
SHARES = {"ops": 0.3, "attention": 0.4, "loss fused": 0.15, "loss optax": 0.15}
# Kept back from a section's own deadline for its process start-up and its last case.
MARGIN_S = {False: 30.0, True: 5.0}


def child_main(section: str, quick: bool, seconds: float, op_names: list[str]) -> None:
    """Run one section in this process, printing its records as JSON lines."""
    from benchmarks import accelerator_attention, accelerator_loss, accelerator_ops

    deadline = Deadline(seconds)
    sizes = shapes(quick)
    emit(kind="device", **device_record())
    if section == "ops":
        accelerator_ops.run(sizes, deadline, tuple(op_names))
    elif section == "attention":
        accelerator_attention.run(sizes, deadline)
    else:
        accelerator_loss.run(sizes, deadline, section.split()[1])


def _decode(stream: str | bytes | None) -> str:
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream or ""


def run_section(
    section: str, quick: bool, allowance: float, op_names: list[str]
) -> tuple[list[dict], str | None]:
    """The section's records, and why it stopped early (``None`` if it finished)."""
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--child", section]
    cmd += ["--seconds", f"{max(allowance - MARGIN_S[quick], 1.0):.1f}"]
    cmd += ["--ops", *op_names] + (["--quick"] if quick else [])
    env = {**os.environ, **MALLOC_ENV}
    why = None
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=allowance
        )
        stdout, stderr = proc.stdout, proc.stderr
        if proc.returncode != 0:
            last = (stderr.strip().splitlines() or ["?"])[-1][:120]
            why = f"its process exited with status {proc.returncode}: {last}"
    except subprocess.TimeoutExpired as expired:  # keep what it printed before
        stdout, stderr = _decode(expired.stdout), _decode(expired.stderr)
        why = f"its process was stopped after {allowance:.0f} s"
    records = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    if why is not None:
        print(stderr[-2000:], file=sys.stderr)
    return records, why


def default_out(quick: bool) -> pathlib.Path:
    if quick:
        return pathlib.Path(tempfile.mkdtemp()) / "accelerator_benchmarks.md"
    return REPO_ROOT / "docs" / "accelerator_benchmarks.md"


def main(argv: list[str]) -> None:
    from benchmarks.accelerator_ops import OPS

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accelerator", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="the Markdown file")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="a subset")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child_main(args.child, args.quick, args.seconds, args.ops)
        return

    from benchmarks.accelerator_page import Records, render

    start = time.monotonic()
    end = start + ALLOWANCE_S[args.quick]
    load_at_start = load_average()
    records, notes = [], {}
    for index, section in enumerate(SHARES):
        left = sum(list(SHARES.values())[index:])
        allowance = (end - time.monotonic()) * SHARES[section] / left
        if allowance < MARGIN_S[args.quick]:  # too little left even to start a process
            found, why = [], "the run's time allowance was spent"
        else:
            found, why = run_section(section, args.quick, allowance, args.ops)
        print(f"{section}: {len(found)} records" + (f" ({why})" if why else ""), flush=True)
        records += found
        if why is not None:
            notes[section.split()[0]] = why
    # Imported jax only now: on a GPU the parent would otherwise hold most of its memory.
    info = describe()
    info["load average"] = f"{load_at_start} at start, {load_average()} at end"
    info["wall time"] = f"{time.monotonic() - start:.0f} s, compilation included"
    text = render(
        Records(records, notes), info, shapes(args.quick), args.quick, tuple(args.ops)
    )
    out = args.out or default_out(args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
