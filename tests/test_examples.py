"""The example scripts: each trains in each framework, resumes from its checkpoint, runs
data parallel with the same losses, and the transformer's --compare-naive finds the NaN.

CI-sized runs call the scripts' ``main`` in this process with tiny models; the
data-parallel check needs its own process (XLA reads the device count at start-up). The
full default runs, with the figures the README quotes, are marked ``slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("optax")
pytest.importorskip("flax")
pytest.importorskip("equinox")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import _checkpoint  # noqa: E402
import classifier  # noqa: E402
import transformer  # noqa: E402

CLASSIFIER_TINY = ["--eval-every", "10"]
TRANSFORMER_TINY = [
    *("--width", "32", "--depth", "1", "--heads", "2", "--seq-len", "32"),
    *("--batch-size", "8", "--sample-chars", "20", "--eval-every", "4"),
]


def _assert_loss_falls(trained) -> None:
    val = [v["loss"] for v in trained.history.val]
    train = [loss for _, loss in trained.history.train]
    assert all(map(math.isfinite, val + train))
    assert val[-1] < 0.9 * val[0], val
    assert np.mean(train[-3:]) < np.mean(train[:3]), train


def _assert_resumes(script, argv: list[str], framework: str, first: int, total: int):
    """Train ``first`` steps, check the checkpoint holds the trained parameters, resume to
    ``total`` steps, and check the resumed run starts from exactly that state."""
    saved = script.main([*argv, "--steps", str(first)])
    _assert_loss_falls(saved)
    out = Path(argv[argv.index("--out") + 1])
    like = {"params": saved.params, "opt_state": saved.opt_state, "step": jnp.int32(0)}
    restored = _checkpoint.restore(out, framework, like)
    assert int(restored["step"]) == first
    for key in ("params", "opt_state"):
        leaves = zip(jax.tree.leaves(restored[key]), jax.tree.leaves(like[key]), strict=True)
        for a, b in leaves:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    resumed = script.main([*argv, "--steps", str(total), "--resume"])
    # The restored parameters reproduce the saved run's last validation loss ...
    assert resumed.resumed_val["loss"] == pytest.approx(saved.val["loss"], rel=1e-6)
    # ... and the step counter and loss history carry on from the checkpoint.
    assert [s for s, _ in resumed.history.train] == list(range(1, total + 1))
    assert resumed.history.train[:first] == saved.history.train
    assert json.loads((out / "metrics.json").read_text())["history"]["train"][-1][0] == total
    assert (out / "curves.png").stat().st_size > 0
    return resumed


@pytest.mark.parametrize("framework", classifier.FRAMEWORKS)
def test_classifier_trains_and_resumes(framework, tmp_path):
    argv = [*CLASSIFIER_TINY, "--framework", framework, "--out", str(tmp_path)]
    resumed = _assert_resumes(classifier, argv, framework, first=30, total=40)
    assert resumed.val["accuracy"] > 0.8


@pytest.mark.parametrize("framework", transformer.FRAMEWORKS)
def test_transformer_trains_resumes_and_samples(framework, tmp_path, capsys):
    argv = [*TRANSFORMER_TINY, "--framework", framework, "--out", str(tmp_path)]
    _assert_resumes(transformer, argv, framework, first=8, total=12)
    printed = capsys.readouterr().out
    assert "--- sample (20 characters" in printed
    assert f"transformer {framework}: validation loss" in printed


def test_transformer_long_context_matches_the_masked_model(tmp_path):
    """--context trains on the chunked path with the causal mask alone; on right-padded
    rows that gives the same losses as the dense path's causal-and-padding mask."""
    argv = [*TRANSFORMER_TINY, "--steps", "3", "--eval-every", "3", "--sample-chars", "0"]
    masked = transformer.main([*argv, "--out", str(tmp_path / "masked")])
    long = transformer.main([*argv, "--context", "32", "--out", str(tmp_path / "long")])
    np.testing.assert_allclose(
        [loss for _, loss in long.history.train],
        [loss for _, loss in masked.history.train],
        rtol=1e-4,
    )
    with pytest.raises(SystemExit):
        transformer.main([*argv, "--context", "32", "--framework", "equinox"])


@pytest.mark.parametrize("framework", transformer.FRAMEWORKS)
def test_compare_naive_finds_nan_only_in_textbook_attention(framework, capsys):
    # With seed 2 the second batch of this size is the first with padding.
    argv = [*TRANSFORMER_TINY, "--framework", framework, "--seed", "2", "--compare-naive", "3"]
    comparison = transformer.main(argv)
    reports, masked = comparison.reports, comparison.masked_rows
    assert any(masked), "no batch with padding: the comparison would show nothing"
    first = next(i for i, rows in enumerate(masked) if rows)
    for name in ("stablelayers", "stablelayers, no sinks"):
        assert all(math.isfinite(r.loss) and r.nan_grads == 0 for r in reports[name])
    textbook, no_sinks = reports["textbook"], reports["stablelayers, no sinks"]
    # The same numbers as stablelayers without sinks until a batch has a fully masked
    # row, then NaN gradients.
    for theirs, ours in zip(textbook[:first], no_sinks[:first], strict=True):
        assert theirs.loss == pytest.approx(ours.loss, rel=1e-5)
        assert theirs.grad_norm == pytest.approx(ours.grad_norm, rel=1e-4)
    assert textbook[first].nan_grads > 0
    assert "textbook" in capsys.readouterr().out


_DATA_PARALLEL = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, transformer
    assert jax.device_count() == 4, jax.devices()
    argv = sys.argv[3:]
    results = {}
    for framework in transformer.FRAMEWORKS:
        runs = {}
        for extra in ([], ["--data-parallel"]):
            out = f"{sys.argv[2]}/{framework}{extra}"
            trained = transformer.main([*argv, "--framework", framework, "--out", out, *extra])
            runs[bool(extra)] = {
                "train": [loss for _, loss in trained.history.train],
                "val": [v["loss"] for v in trained.history.val],
                "devices": sorted(
                    {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(trained.params)}
                ),
                "replicated": all(
                    x.sharding.is_fully_replicated for x in jax.tree.leaves(trained.params)
                ),
            }
        results[framework] = runs
    print("RESULTS" + json.dumps(results))
    """
)


def test_data_parallel_matches_one_device(tmp_path):
    argv = [*TRANSFORMER_TINY, "--steps", "6", "--sample-chars", "0", "--eval-every", "3"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, "-c", _DATA_PARALLEL, str(EXAMPLES), str(tmp_path), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS"))
    for framework, runs in json.loads(line.removeprefix("RESULTS")).items():
        single, parallel = runs["false"], runs["true"]
        assert single["devices"] == [1] and parallel["devices"] == [4], framework
        assert parallel["replicated"], framework
        np.testing.assert_allclose(parallel["train"], single["train"], rtol=1e-5)
        np.testing.assert_allclose(parallel["val"], single["val"], rtol=1e-5)
        assert parallel["train"][-1] < parallel["train"][0]


@pytest.mark.parametrize("script", [classifier, transformer], ids=lambda s: s.__name__)
def test_help_explains_every_flag(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for action in script.build_parser()._actions:
        assert action.help and len(action.help) >= 10, action.option_strings
        assert all(flag in text for flag in action.option_strings)


def _run_default(script: str, framework: str, out: Path) -> tuple[dict, float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{script}.py"), "--framework", framework,
         "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return json.loads((out / "metrics.json").read_text()), seconds, done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("framework", classifier.FRAMEWORKS)
def test_classifier_default_run(framework, tmp_path):
    metrics, seconds, stdout = _run_default("classifier", framework, tmp_path)
    # The time is reported, never asserted: wall-clock limits are flaky on shared machines.
    print(stdout.splitlines()[-1], f"({seconds:.0f} s wall, target < 60 s)")
    assert metrics["final"]["accuracy"] >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize("framework", transformer.FRAMEWORKS)
def test_transformer_default_run(framework, tmp_path):
    metrics, seconds, stdout = _run_default("transformer", framework, tmp_path)
    print(stdout.splitlines()[-1], f"({seconds:.0f} s wall, target < 300 s)")
    assert "--- sample" in stdout
    assert metrics["final"]["below_bigram"] >= 0.40


_CONTEXT_PARALLEL = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, transformer
    assert jax.device_count() == 2, jax.devices()
    argv = sys.argv[3:]
    runs = {}
    for extra in ([], ["--context-parallel", "2"]):
        out = f"{sys.argv[2]}/cp{len(extra)}"
        trained = transformer.main([*argv, "--out", out, *extra])
        runs[len(extra)] = [loss for _, loss in trained.history.train]
    print("RESULTS" + json.dumps(runs))
    """
)


def test_context_parallel_matches_one_device(tmp_path):
    """--context-parallel 2: ring attention over 2 devices, the same losses as one device
    (the ring's merge by logsumexp reorders float32 sums, hence the tolerance)."""
    argv = [*TRANSFORMER_TINY, "--steps", "3", "--sample-chars", "0", "--eval-every", "3"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [sys.executable, "-c", _CONTEXT_PARALLEL, str(EXAMPLES), str(tmp_path), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS"))
    runs = json.loads(line.removeprefix("RESULTS"))
    np.testing.assert_allclose(runs["2"], runs["0"], rtol=1e-5)
