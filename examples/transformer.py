"""Train a character-level transformer language model on CPython's own documentation.

The 79 English help topics in `pydoc_data.topics` (465k characters, no download); whole
documents are held out for validation. Documents are cut into rows of --seq-len
characters and the last row of each is right-padded, so causal and padding masks together
leave query rows with no key at all: stablelayers' attention gives them exactly 0 (and a
learnable sink per head lets any row attend to nothing), where the textbook softmax gives
NaN (see --compare-naive). With --packing the documents are instead concatenated into
full rows, each token attending only to its own document through segment ids. Pre-norm
blocks, Optax AdamW with linear warm-up, cosine decay and gradient clipping. The script
reports the validation loss against a character bigram model counted on the same split,
and prints a generated sample.

Writes to --out: checkpoint (Orbax; checkpoint.eqx for Equinox), metrics.json and
curves.png. Examples:
  python examples/transformer.py --framework equinox --steps 200
  python examples/transformer.py --compare-naive
  python examples/transformer.py --context 4096 --batch-size 4  # long context, chunked
  python examples/transformer.py --data-parallel  # every local GPU or TPU core
  python examples/transformer.py --context-parallel 4  # sequence split over 4 devices
  python examples/transformer.py --tensor-parallel 4  # vocabulary split over 4 devices
  python examples/transformer.py --packing  # documents packed, no padding
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the run's wall time includes importing JAX

import argparse  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402


def _force_host_devices(argv: Sequence[str]) -> None:
    """--context-parallel N (or --tensor-parallel N) on CPU needs N devices, a number XLA
    reads once, when JAX starts: ask for N host devices before importing it (GPU and TPU
    devices are not affected). An XLA_FLAGS that already sets the count is left alone."""
    for i, arg in enumerate(argv):
        n = None
        for flag in ("--context-parallel", "--tensor-parallel"):
            if arg.startswith(f"{flag}="):
                n = arg.split("=", 1)[1]
            if arg == flag and i + 1 < len(argv):
                n = argv[i + 1]
        flags = os.environ.get("XLA_FLAGS", "")
        if n and n.isdigit() and "xla_force_host_platform_device_count" not in flags:
            count = f"--xla_force_host_platform_device_count={n}"
            os.environ["XLA_FLAGS"] = f"{flags} {count}".strip()


if __name__ == "__main__":
    _force_host_devices(sys.argv[1:])

import jax  # noqa: E402
import optax  # noqa: E402

import _cli  # noqa: E402
import _data  # noqa: E402
import _lm_task  # noqa: E402
import _naive  # noqa: E402
from _lm import LMConfig  # noqa: E402
from _parallel import Placement  # noqa: E402
from _train import Run, Trained, fit  # noqa: E402

FRAMEWORKS = ("nnx", "equinox")


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("transformer", __doc__, FRAMEWORKS, evals=10)
    p.set_defaults(steps=1200)
    model = p.add_argument_group("model")
    model.add_argument("--width", type=int, default=128, help="embedding width")
    model.add_argument("--depth", type=int, default=4, help="number of transformer blocks")
    model.add_argument("--heads", type=int, default=4, help="attention heads per block")
    model.add_argument("--seq-len", type=int, default=64, help="characters of context per row")
    model.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="train at long context: N characters per row (replaces --seq-len), causal "
        "attention on stablelayers' chunked path, whose memory grows linearly with N, and "
        "no N x N mask (nnx only)",
    )
    model.add_argument(
        "--packing",
        action="store_true",
        help="concatenate the documents into full rows (padding only at the tail of the "
        "last row) with a segment id per token, 1, 2, ... for the documents of a row: "
        "attention is causal within each document (segment_ids=, no L x L mask), "
        "positions count from each document's start, and a target in the next document "
        "is ignored by the loss. Validation packs the held-out documents the same way",
    )
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=32, help="rows per step")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    train.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps of linear warm-up from 0 to --lr, then cosine decay to --lr/10 at "
        "--steps (default: 5%% of --steps)",
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        help="AdamW weight decay of the matrices (not of biases, norms, sinks)",
    )
    train.add_argument("--clip", type=float, default=1.0, help="gradient global-norm clip")
    train.add_argument(
        "--data-parallel",
        action="store_true",
        help="split each batch over all local devices (jax.sharding Mesh and "
        "NamedSharding) and replicate the parameters; --batch-size must divide evenly. "
        "To try it on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=4",
    )
    train.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split each row's sequence over N devices: causal ring attention "
        "(stablelayers.ring_attention_sharded, zigzag layout) for --framework nnx; "
        "--seq-len must be a multiple of 2N. Run as a script on CPU, it sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N itself",
    )
    train.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the output head's vocabulary over N devices: the fused loss with each "
        "device walking its own columns (stablelayers' LMHead(vocab_axis=...), "
        "linear_softmax_cross_entropy_sharded) for --framework nnx; the vocabulary must "
        "be a multiple of N. Run as a script on CPU, it sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N itself",
    )
    sample = p.add_argument_group("sampling")
    sample.add_argument("--prompt", default="The ", help="start of the generated sample")
    sample.add_argument(
        "--sample-chars", type=int, default=400, help="characters to generate (0: none)"
    )
    sample.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument(
        "--compare-naive",
        type=int,
        nargs="?",
        const=5,
        default=None,
        metavar="STEPS",
        help="do not train: run STEPS optimiser steps (default 5) on the first training "
        "batches from the same initial weights with stablelayers' attention (with and "
        "without sinks) and with the textbook one (jnp.where(mask, logits, -inf), then "
        "jax.nn.softmax), and print each step's loss, gradient norm and NaN count",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = _cli.parse(parser, argv)
    if args.packing and args.compare_naive is not None:
        parser.error("--packing leaves no row without keys for --compare-naive to show")
    if args.context is not None:
        if args.framework != "nnx" or args.compare_naive is not None:
            parser.error("--context needs --framework nnx and no --compare-naive")
        args.seq_len = args.context
    if args.context_parallel > 1:
        if args.framework != "nnx" or args.compare_naive is not None or args.data_parallel:
            parser.error(
                "--context-parallel needs --framework nnx, no --compare-naive and no "
                "--data-parallel"
            )
        if args.seq_len % (2 * args.context_parallel):
            parser.error(f"--seq-len must be a multiple of {2 * args.context_parallel}")
    if args.tensor_parallel > 1:
        if args.framework != "nnx" or args.compare_naive is not None or args.data_parallel:
            parser.error(
                "--tensor-parallel needs --framework nnx, no --compare-naive and no "
                "--data-parallel"
            )
        if args.context_parallel > 1:
            parser.error("--tensor-parallel and --context-parallel are not combined here")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    return args


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, max(args.steps, args.warmup + 1), args.lr / 10
    )
    return optax.chain(
        optax.clip_by_global_norm(args.clip),
        optax.adamw(
            schedule,
            b2=0.99,
            weight_decay=args.weight_decay,
            # Decay the matrices only: biases, norms and sinks have no scale to shrink.
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        ),
    )


def main(argv: Sequence[str] | None = None) -> Trained | _naive.Comparison:
    args = parse_args(argv)
    corpus = _data.load_corpus(args.seed)
    models = importlib.import_module(f"_{args.framework}_models")
    config = LMConfig(
        corpus.vocab_size,
        args.seq_len,
        args.width,
        args.depth,
        args.heads,
        long_context=args.context is not None,
        context_parallel=args.context_parallel,
        tensor_parallel=args.tensor_parallel,
    )
    if corpus.vocab_size % args.tensor_parallel:
        raise SystemExit(
            f"--tensor-parallel {args.tensor_parallel}: the {corpus.vocab_size} tokens "
            "do not split evenly"
        )
    data = _data.PackedBatches if args.packing else _data.TextBatches
    batches = data(corpus.train, args.seq_len, args.batch_size, args.seed)
    optimizer = make_optimizer(args)

    if args.compare_naive is not None:
        return compare_naive(args, models, config, batches, optimizer)

    placement = Placement(args.data_parallel, args.context_parallel, args.tensor_parallel)
    placement.check_batch_size(args.batch_size)
    model = models.lm(config, args.seed)
    bigram = _data.bigram_loss(corpus)
    print(
        f"{len(corpus.train)} training documents, {len(corpus.val)} held out "
        f"({sum(map(len, corpus.val)):,} characters); {corpus.vocab_size} tokens; "
        f"bigram baseline {bigram:.4f} nats/char; {placement.describe()}"
    )
    run = Run(
        loss=_lm_task.mean_loss(model),
        batch_at=batches,
        evaluate=_lm_task.evaluator(
            model, corpus, args.seq_len, args.batch_size, placement, bigram, args.packing
        ),
        steps=args.steps,
        eval_every=args.eval_every,
        out=args.out,
        framework=args.framework,
        resume=args.resume,
        placement=placement,
        config=_cli.settings(args),
        must_match=("framework", "width", "depth", "heads", "seq_len"),
        name="transformer",
        baseline=("character bigram", bigram),
    )
    trained = fit(model, optimizer, run)
    if args.sample_chars:
        text = _lm_task.sample(
            model, trained.params, corpus, args.prompt, args.sample_chars,
            args.seq_len, args.temperature, args.seed, args.packing,
        )  # fmt: skip
        print(f"--- sample ({args.sample_chars} characters, temperature {args.temperature})")
        print(text)
        print("---")
    val, below = trained.val["loss"], trained.val["below_bigram"]
    print(f"curves: {trained.plot}  checkpoint: {trained.checkpoint}")
    if not args.resume:  # the rate of a resumed run's steps alone would need their start
        print(throughput(batches, trained.history.step, trained.train_seconds))
    print(
        f"transformer {args.framework}: validation loss {val:.4f} nats/char, bigram "
        f"baseline {bigram:.4f}, {abs(below):.1%} {'below' if below >= 0 else 'above'} it; "
        f"{trained.history.step} steps, "
        f"training {trained.train_seconds:.0f} s, total {time.perf_counter() - _STARTED:.0f} s"
    )
    return trained


def throughput(batches, steps: int, seconds: float) -> str:
    """Input positions and loss targets (positions whose target is not ignored) trained
    per second over ``steps`` steps; the time includes compiling the step and the
    evaluations."""
    positions = targets = 0
    for step in range(1, steps + 1):
        batch = batches(step)
        targets += int((_lm_task.targets(batch) != _data.PAD).sum())
        positions += batch.tokens.size if isinstance(batch, _data.Packed) else batch[:, 1:].size
    return (
        f"throughput: {positions / seconds:,.0f} positions/s, {targets / seconds:,.0f} "
        f"targets/s ({targets / positions:.2%} of the positions are targets)"
    )


def compare_naive(args, models, config, batches, optimizer) -> _naive.Comparison:
    """Same weights, same batches: stablelayers' attention, then the textbook one."""
    # Without sinks stablelayers computes the textbook function wherever a query has a key,
    # so that column isolates what the fully masked rows do.
    variants = {
        "stablelayers": config,
        "stablelayers, no sinks": LMConfig(**{**vars(config), "sinks": False}),
        "textbook": LMConfig(**{**vars(config), "sinks": False, "textbook": True}),
    }
    contenders = {name: models.lm(c, args.seed) for name, c in variants.items()}
    print(
        f"--compare-naive ({args.framework}): {args.compare_naive} steps on the same "
        "batches from the same initial weights; 'masked rows' counts the query rows whose "
        "keys are all masked (padding)"
    )
    comparison = _naive.compare(
        contenders, _lm_task.mean_loss, optimizer, batches, args.compare_naive
    )
    _naive.print_table(comparison)
    return comparison


if __name__ == "__main__":
    main()
