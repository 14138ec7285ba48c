"""``python -m benchmarks.accelerator --quick`` writes every section, and a contender that
cannot run here reads ``n/a (why)`` instead of stopping the run."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.accelerator_common import QUICK
from benchmarks.accelerator_page import Records, render

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Ops against jax.nn", "## Causal attention", "## Fused loss against optax")


def _quick(tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "accelerator.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accelerator", "--quick", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


def _rows(text: str, first: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith(f"| {first} |")
    ]


def _check_page(text: str, ops: tuple[str, ...]) -> None:
    assert "Not measured on an accelerator" in text and "Quick run" in text
    assert all(section in text for section in SECTIONS)
    for op in ops:  # both contenders timed, float32 and bfloat16, forward and gradient
        rows = _rows(text, op)
        assert len(rows) == 4
        assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
    attention = {row[2]: row[3] for row in _rows(text, str(QUICK.lengths[0]))}
    assert set(attention) == {
        "stablelayers chunked",
        "stablelayers dense",
        "stablelayers cudnn",
        "jax.nn xla",
        "jax.nn cudnn",
    }
    for contender, time_ms in attention.items():
        if contender.endswith("cudnn"):  # no GPU here: said, not crashed
            assert time_ms.startswith("n/a (cuDNN needs an NVIDIA GPU")
        else:
            assert float(time_ms) > 0
    for contender in ("fused", "optax"):
        assert float(_rows(text, contender)[0][1]) > 0
    assert "not a measured peak" in text  # the CPU has no allocator statistics


# Slow (20 s): CI's 20 minutes; the in-process row test below stays in CI.
@pytest.mark.slow
def test_quick_accelerator_benchmark_one_op(tmp_path):
    _check_page(_quick(tmp_path, "--ops", "softmax"), ("softmax",))


@pytest.mark.slow
def test_quick_accelerator_benchmark(tmp_path):
    from benchmarks.accelerator_ops import OPS

    _check_page(_quick(tmp_path), OPS)


def test_rows_no_section_handed_back_read_not_measured():
    # A section whose process died or ran out of time: its rows say so, the page is whole.
    records = [{"kind": "device", "platform": "gpu", "device_kind": "NVIDIA H100"}]
    why = "its process was stopped after 100 s"
    notes = {"ops": why, "attention": why, "loss": why}
    text = render(Records(records, notes), {}, QUICK, False, ("softmax",))
    assert all(section in text for section in SECTIONS)
    assert "Not measured on an accelerator" not in text and "Quick run" not in text
    assert _rows(text, "softmax")[0][3] == f"n/a (not measured: {why})"
    assert _rows(text, "fused")[0][1] == f"n/a (not measured: {why})"
