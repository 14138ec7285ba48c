"""``python -m benchmarks.attention --quick`` runs every contender and writes its table."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_attention_benchmark(tmp_path):
    out = tmp_path / "attention.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.attention", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "Quick run" in text
    rows = [line for line in text.splitlines() if line.startswith("| 256 |")]
    assert [row.split("|")[3].strip() for row in rows] == [
        "chunked",
        "dense",
        "jax.nn",
        "torch",
        "torch 1 thread",
    ]
    for row in rows[:3]:  # the jax ones ran (torch may not be installed)
        time_ms, peak = row.split("|")[4:6]
        assert float(time_ms.replace(",", "")) > 0 and float(peak.replace(",", "")) > 0


@pytest.mark.slow
def test_quick_packed_benchmark(tmp_path):
    out = tmp_path / "packed.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.packed", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [
        line for line in out.read_text().splitlines() if line.startswith("| chunked, 8 x 64 |")
    ]
    assert len(rows) == 1 and rows[0].endswith("| no |")
