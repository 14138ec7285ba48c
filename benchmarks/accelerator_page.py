"""The Markdown page of ``python -m benchmarks.accelerator``, from the sections' records."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import accelerator_attention as attention
from benchmarks import accelerator_loss as loss
from benchmarks import accelerator_ops as ops
from benchmarks.accelerator_common import Shapes
from benchmarks.markdown import MIB, fmt_ms, table
from benchmarks.timing import BOUND_OF_MODE

Record = dict[str, Any]
COMMAND = "python -m benchmarks.accelerator"


class Records:
    """The records of every section, looked up by their identifying fields; a row that no
    section handed back reads ``n/a (not measured: why)``, the why its section's note."""

    def __init__(self, records: list[Record], notes: dict[str, str]) -> None:
        self.records = records
        self.notes = notes  # kind -> why its missing rows are missing

    def find(self, kind: str, **fields: Any) -> Record:
        for record in self.records:
            if record.get("kind") == kind and all(
                record.get(k) == v for k, v in fields.items()
            ):
                return record
        why = self.notes.get(kind, "its section handed back no row")
        return {"status": f"n/a (not measured: {why})"}

    def device(self) -> Record:
        return next((r for r in self.records if r.get("kind") == "device"), {})


def _time(record: Record) -> str:
    if record["status"] != "ok":
        return str(record["status"])
    return fmt_ms(record["ms"]) if "ms" in record else "n/a (not timed)"


def _ratio(record: Record, reference: Record, key: str = "ms") -> str:
    if record.get(key) is None or not reference.get(key):
        return "-"
    return f"{record[key] / reference[key]:.2f}"


def _mib(value: float | None) -> str:
    if value is None:
        return "-"
    mib = value / MIB
    return f"{mib:,.0f}" if mib >= 100 else f"{mib:.3g}"


def _bytes(record: Record) -> str:
    if "bytes_accessed" not in record:
        return "-"
    return (
        "n/a (no cost model)"
        if record["bytes_accessed"] is None
        else _mib(record["bytes_accessed"])
    )


def header(records: Records, info: dict[str, str], quick: bool) -> list[str]:
    device = records.device()
    platform = device.get("platform", "unknown")
    lines = ["# Accelerator benchmarks", ""]
    if platform not in ("gpu", "tpu"):
        lines += [
            '!!! warning "Not measured on an accelerator"',
            f"    This page was written by a run on `{platform}` "
            f"(`{device.get('device_kind', 'unknown')}`), not on a GPU or TPU: its "
            "figures say nothing about an accelerator. Run "
            f"`{COMMAND}` on one to measure it.",
            "",
        ]
    if quick:
        lines += ["**Quick run: tiny shapes, a smoke test, not figures to quote.**", ""]
    lines += [
        f"Written by `{COMMAND}{' --quick' if quick else ''}`. Every contender is "
        "compiled ahead of time (`jax.jit(...).lower(...).compile()`) and called with "
        "`jax.block_until_ready`; the contenders of a group run interleaved, one call each "
        "per round, and a time is the median over the rounds (one untimed round first). "
        "Each section runs in its own process; the fused loss runs each contender in its "
        "own.",
        "",
    ]
    lines += [f"- device: `{device.get('device_kind', 'unknown')}` ({platform})"]
    if device.get("bytes_limit"):
        lines += [f"- device memory pool: {device['bytes_limit'] / 2**30:.1f} GiB"]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    return [*lines, ""]


def ops_section(records: Records, sizes: Shapes, op_names: tuple[str, ...]) -> list[str]:
    rows, bandwidth = [], []
    for dtype in ops.DTYPES:
        for mode in ops.MODES:
            bound = BOUND_OF_MODE[mode]
            bound_rates = []
            for op in op_names:
                fields = {"op": op, "dtype": dtype, "mode": mode}
                ours = records.find("ops", contender="stablelayers", **fields)
                peer = records.find("ops", contender="jax.nn", **fields)
                ref = records.find("ops", contender=bound, **fields)
                if "gbps" in ref:
                    bound_rates.append(ref)
                rows.append(
                    [
                        op,
                        dtype,
                        mode.replace("_", "-"),
                        _time(ours),
                        _time(peer),
                        _ratio(ours, peer),
                        _ratio(ours, ref),
                        _ratio(peer, ref),
                        _bytes(ours),
                        _bytes(peer),
                        _ratio(ours, peer, "bytes_accessed"),
                    ]
                )
            if bound_rates:
                ms = statistics.median(r["ms"] for r in bound_rates)
                gbps = statistics.median(r["gbps"] for r in bound_rates)
                bandwidth.append(
                    [dtype, mode.replace("_", "-"), bound, fmt_ms(ms), f"{gbps:,.0f}"]
                )
            else:
                status = records.find("ops", contender=bound, dtype=dtype, mode=mode)
                bandwidth.append([dtype, mode.replace("_", "-"), bound, _time(status), "-"])
    shape = "x".join(map(str, sizes.ops))
    lines = [
        "## Ops against jax.nn",
        "",
        f"Each op over the last axis of a {shape} array. Value-and-grad is of "
        "`sum(f(x) * w)` with respect to x. `/ bound` is the time over that of the "
        "bandwidth reference timed in the same rounds: `copy` (`y = 2 x`, one read and one "
        "write of the array: the least a forward pass moves) for the forward pass, `axpy` "
        "(`2 x + w`, two reads and one write: the least a value-and-grad moves) for "
        "value-and-grad. Bytes accessed is XLA's cost model of the compiled program "
        "(`compiled.cost_analysis()['bytes accessed']`), not a measurement; it is n/a "
        "for a program XLA cannot cost, such as stablelayers' CPU kernels (custom calls; "
        "`STABLELAYERS_CPU_KERNELS=0` runs the pure-JAX path that GPUs and TPUs run).",
        "",
    ]
    lines += table(
        [
            "op",
            "dtype",
            "mode",
            "stablelayers (ms)",
            "jax.nn (ms)",
            "stablelayers / jax.nn",
            "stablelayers / bound",
            "jax.nn / bound",
            "stablelayers bytes accessed (MiB)",
            "jax.nn bytes accessed (MiB)",
            "bytes ratio",
        ],
        rows,
    )
    lines += [
        "",
        "The device's bandwidth, from the references (median over the groups; GB/s is "
        "10^9 bytes moved per second):",
        "",
    ]
    lines += table(["dtype", "mode", "reference", "time (ms)", "GB/s"], bandwidth)
    return [*lines, ""]


def attention_section(records: Records, sizes: Shapes) -> list[str]:
    rows = []
    for length in sizes.lengths:
        for mode in attention.MODES:
            fields = {"length": length, "mode": mode}
            xla = records.find("attention", contender="jax.nn xla", **fields)
            cudnn = records.find("attention", contender="jax.nn cudnn", **fields)
            for contender in attention.CONTENDERS:
                record = records.find("attention", contender=contender, **fields)
                rows.append(
                    [
                        str(length),
                        mode.replace("_", "-"),
                        contender,
                        _time(record),
                        _ratio(record, xla),
                        _ratio(record, cudnn),
                        _mib(record.get("temp_bytes")),
                    ]
                )
    lines = [
        "## Causal attention",
        "",
        f"Causal self-attention, batch 1, {sizes.heads} heads, head dim {sizes.head_dim}, "
        "bfloat16 q, k and v; value-and-grad is of `sum(out)` (in float32) with respect to "
        "q, k and v. `stablelayers ...` is `stablelayers.dot_product_attention(..., "
        "is_causal=True, implementation=...)`, `jax.nn ...` is "
        "`jax.nn.dot_product_attention(..., is_causal=True, implementation=...)`. XLA "
        "temp is the compiled program's `memory_analysis().temp_size_in_bytes`. A "
        "program whose temporaries and outputs exceed the device's free memory is not run.",
        "",
    ]
    lines += table(
        [
            "length",
            "mode",
            "contender",
            "time (ms)",
            "/ jax.nn xla",
            "/ jax.nn cudnn",
            "XLA temp (MiB)",
        ],
        rows,
    )
    return [*lines, ""]


def loss_section(records: Records, sizes: Shapes) -> list[str]:
    optax_row = records.find("loss", contender="optax")
    rows = []
    sources = set()
    for contender in loss.CONTENDERS:
        record = records.find("loss", contender=contender)
        peak = record.get("peak_bytes")
        inputs = record.get("inputs_bytes")
        above = None if peak is None or inputs is None else peak - inputs
        if "peak_source" in record:
            sources.add(record["peak_source"])
        rows.append(
            [
                contender,
                _time(record),
                _ratio(record, optax_row),
                _mib(peak),
                _mib(above),
                _ratio(record, optax_row, "peak_bytes"),
                _mib(record.get("temp_bytes")),
            ]
        )
    tokens, hidden, vocab = sizes.loss
    if sources == {"memory_stats"}:
        peak_says = (
            "Peak is the device's `memory_stats()['peak_bytes_in_use']` in that process "
            "(inputs included); above inputs is that less what was in use once the inputs "
            "were made."
        )
    else:
        peak_says = (
            "This device keeps no allocator statistics (`memory_stats()` is None), so "
            "peak is the compiled program's `memory_analysis().temp_size_in_bytes`: XLA's "
            "plan for its temporaries, not a measured peak."
        )
    lines = [
        "## Fused loss against optax",
        "",
        f"Value-and-grad (with respect to hidden and weight) of the mean cross-entropy, "
        f"{tokens} tokens x {hidden} hidden x {vocab} vocabulary, bfloat16 hidden and "
        "weight, each contender in its own process. `fused` is "
        "`stablelayers.linear_softmax_cross_entropy(hidden, weight, labels, "
        "reduction='mean')`; `optax` is `optax.softmax_cross_entropy_with_integer_labels` "
        "on the float32 logits `hidden @ weight`, then the mean. " + peak_says,
        "",
    ]
    lines += table(
        [
            "contender",
            "time (ms)",
            "/ optax",
            "peak (MiB)",
            "above inputs (MiB)",
            "peak / optax",
            "XLA temp (MiB)",
        ],
        rows,
    )
    return [*lines, ""]


def render(
    records: Records,
    info: dict[str, str],
    sizes: Shapes,
    quick: bool,
    op_names: tuple[str, ...],
) -> str:
    lines = header(records, info, quick)
    lines += ops_section(records, sizes, op_names)
    lines += attention_section(records, sizes)
    lines += loss_section(records, sizes)
    return "\n".join(lines)
