"""The benchmark harness runs end to end (quick mode), so it never rots.

Only the files and the rows of the tables are checked: speed is never asserted.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

from benchmarks.config import DEFAULT_HARD_INPUTS, REPO_ROOT


def test_quick_benchmark_writes_report_and_chart(tmp_path: pathlib.Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = (tmp_path / "benchmarks.md").read_text()
    png = (tmp_path / "benchmarks.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert markdown in done.stdout  # the tables are printed too

    contenders = ["stablelayers", "jax.nn"]
    if importlib.util.find_spec("torch") is not None:
        contenders.append("torch")
    for op in ("softmax", "log_softmax", "softplus"):
        for name in contenders:
            assert f"| {op} | {name} |" in markdown, (op, name)
    assert "| softmax | jax.nn custom_jvp |" in markdown
    assert "| bandwidth bound |" in markdown
    for header in ("## Speed", "### Ratios", "## Memory", "## Notes"):
        assert header in markdown
    if DEFAULT_HARD_INPUTS.exists():
        assert "## Accuracy" in markdown
        assert "| op | contender | normal_x1 |" in markdown  # a column per set
        assert "rel. err at dominant arg-max" in markdown
        for name in contenders:
            assert f"\n| {name} | " in markdown  # its softplus row


def test_quick_placement_run_prints_a_median_per_copy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.placement", "--quick"],
        cwd=REPO_ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len([line for line in lines if line.strip()[:1].isdigit()]) == 8  # one per copy
    assert any(line.startswith("stablelayers: ") for line in lines)
    assert any(line.startswith("jax.nn: ") for line in lines)
