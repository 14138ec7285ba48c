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
import _data  # noqa: E402
import classifier  # noqa: E402
import transformer  # noqa: E402
from _lm import LMConfig  # noqa: E402

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


def _check_packing(docs: tuple[np.ndarray, ...], seq_len: int) -> _data.Packed:
    packed = _data.pack_documents(docs, seq_len)
    tokens, targets, segments = packed
    assert tokens.shape == targets.shape == segments.shape == (len(tokens), seq_len)
    stream = np.concatenate(docs)
    owner = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    # Every token of the corpus but the last (which predicts nothing) is an input
    # exactly once, in order; padding only after them, at most the last row's tail.
    n = len(stream) - 1
    real = segments.reshape(-1) > 0
    np.testing.assert_array_equal(tokens.reshape(-1)[real], stream[:-1])
    assert real[:n].all() and not real[n:].any() and len(real) - n < seq_len
    assert (tokens.reshape(-1)[n:] == _data.PAD).all()
    # Within a row, one id per document, 1, 2, ... in order; 0 for the padding.
    ids = np.zeros(len(real), int)
    ids[:n] = owner[:-1]
    first = np.repeat(ids.reshape(-1, seq_len)[:, :1], seq_len, axis=1).reshape(-1)
    np.testing.assert_array_equal(segments.reshape(-1)[:n], ids[:n] - first[:n] + 1)
    # The targets: the next token of the same document, else ignored (PAD): every token
    # but a document's first is a target exactly once.
    same = owner[1:] == owner[:-1]
    expected = np.where(same, stream[1:], _data.PAD)
    np.testing.assert_array_equal(targets.reshape(-1)[:n], expected)
    assert (targets.reshape(-1)[n:] == _data.PAD).all()
    assert (targets != _data.PAD).sum() == len(stream) - len(docs)
    return packed


def test_packing_puts_every_token_once_with_its_document_id():
    rng = np.random.default_rng(0)
    for seq_len in (1, 3, 8):
        docs = tuple(rng.integers(1, 9, size=n) for n in (1, 5, 2, 9, 3))
        _check_packing(docs, seq_len)
    # A row of exactly the stream needs no padding; one token more opens a row.
    full = _check_packing((np.array([1, 2, 3]), np.array([4, 5])), 4)
    assert (full.segment_ids > 0).all()
    np.testing.assert_array_equal(full.segment_ids, [[1, 1, 1, 2]])
    np.testing.assert_array_equal(full.targets, [[2, 3, _data.PAD, 5]])
    corpus = _data.load_corpus(0)
    _check_packing(corpus.train, 64)
    # An epoch of training batches is a shuffle of one packing of the documents (in a
    # shuffled order): every target once, the rows left over at the end dropped.
    batches = _data.PackedBatches(corpus.train, 64, 32, seed=0)
    rows = batches._rows(1)
    targets = int((rows.targets != _data.PAD).sum())
    assert targets == sum(map(len, corpus.train)) - len(corpus.train)
    epoch = [batches(step) for step in range(batches.per_epoch + 1, 2 * batches.per_epoch + 1)]
    np.testing.assert_array_equal(
        np.concatenate([b.segment_ids for b in epoch]), rows.segment_ids[: 32 * len(epoch)]
    )
    assert len(rows.tokens) - 32 * len(epoch) < 32


@pytest.mark.parametrize("framework", transformer.FRAMEWORKS)
def test_packed_rows_attend_within_each_document(framework, monkeypatch):
    """The model on a packed row gives each document the log-probabilities it gets alone
    in a padded row: segment ids keep the documents apart, positions restart, and no mask
    is passed (the layers would raise on segment ids they could not apply)."""
    models = pytest.importorskip(f"_{framework}_models")
    config = LMConfig(20, 12, 16, 1, 2)
    model = models.lm(config, seed=0)
    docs = [np.arange(1, 6), np.arange(7, 10), np.arange(3, 7)]  # 5 + 3 + 4 = 12
    row = np.concatenate(docs)[None].astype(np.int32)
    ids = np.repeat([1, 2, 3], [len(d) for d in docs])[None].astype(np.int32)
    with monkeypatch.context() as patch:  # the packed path builds no L x L mask

        def no_mask(tokens):
            raise AssertionError("the packed path built an attention mask")

        patch.setattr(models, "attention_mask", no_mask)
        packed = model.apply(model.params, row, None, ids)[0]
    start = 0
    for doc in docs:
        alone = np.zeros((1, 12), np.int32)
        alone[0, : len(doc)] = doc
        expected = model.apply(model.params, alone)[0, : len(doc)]
        np.testing.assert_allclose(packed[start : start + len(doc)], expected, atol=2e-5)
        start += len(doc)


def test_transformer_trains_on_packed_documents(tmp_path, capsys):
    """--packing trains, and the --context chunked path gives the dense path's losses on
    the same packed rows (segment ids on both, no L x L mask on either)."""
    argv = [*TRANSFORMER_TINY, "--steps", "4", "--eval-every", "4", "--packing"]
    dense = transformer.main([*argv, "--out", str(tmp_path / "dense")])
    train = [loss for _, loss in dense.history.train]
    assert all(map(math.isfinite, train)) and train[-1] < train[0]
    assert dense.val["loss"] < dense.history.val[0]["loss"]
    assert "--- sample (20 characters" in capsys.readouterr().out
    long = transformer.main(
        [*argv, "--context", "32", "--sample-chars", "0", "--out", str(tmp_path / "long")]
    )
    np.testing.assert_allclose([loss for _, loss in long.history.train], train, rtol=1e-4)
    with pytest.raises(SystemExit):
        transformer.main([*argv, "--compare-naive"])


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


# Slow (40 s): CI's 20 minutes; the ring and data-parallel paths have their own tests.
@pytest.mark.slow
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
    for packing in ([], ["--packing"]):
        for extra in ([], ["--context-parallel", "2"]):
            out = f"{sys.argv[2]}/cp{len(extra)}{packing}"
            trained = transformer.main([*argv, "--out", out, *extra, *packing])
            runs[f"{len(extra)}{packing}"] = [loss for _, loss in trained.history.train]
    print("RESULTS" + json.dumps(runs))
    """
)


# Slow (40 s): CI's 20 minutes; the ring and data-parallel paths have their own tests.
@pytest.mark.slow
def test_context_parallel_matches_one_device(tmp_path):
    """--context-parallel 2: ring attention over 2 devices, the same losses as one device
    (the ring's merge by logsumexp reorders float32 sums, hence the tolerance), padded
    and packed (segment ids travelling round the ring)."""
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
    np.testing.assert_allclose(runs["2[]"], runs["0[]"], rtol=1e-5)
    np.testing.assert_allclose(runs["2['--packing']"], runs["0['--packing']"], rtol=1e-5)
    assert runs["0['--packing']"] != runs["0[]"]


_TENSOR_PARALLEL = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, transformer
    assert jax.device_count() == 4, jax.devices()
    argv = sys.argv[3:]
    runs = {}
    for extra in ([], ["--tensor-parallel", "4"]):
        trained = transformer.main([*argv, "--out", f"{sys.argv[2]}/tp{len(extra)}", *extra])
        runs["tp" if extra else "one"] = [loss for _, loss in trained.history.train]
    print("RESULTS" + json.dumps(runs))
    """
)


@pytest.mark.slow
def test_tensor_parallel_matches_one_device(tmp_path):
    """--tensor-parallel 4: the head's vocabulary (104 characters) split over 4 devices
    (LMHead(vocab_axis="tp"), linear_softmax_cross_entropy_sharded), the same training
    losses as one device to float32 rounding (about 21 s, hence slow)."""
    argv = [*TRANSFORMER_TINY, "--steps", "3", "--sample-chars", "0", "--eval-every", "3"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, "-c", _TENSOR_PARALLEL, str(EXAMPLES), str(tmp_path), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS"))
    runs = json.loads(line.removeprefix("RESULTS"))
    np.testing.assert_allclose(runs["tp"], runs["one"], rtol=1e-5)
