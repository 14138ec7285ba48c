"""``python -m benchmarks [--quick] [--out DIR] [--hard-inputs PATH]``: measure, then write
``benchmarks.md`` and ``benchmarks.png`` into DIR and print the tables."""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from benchmarks.config import DEFAULT_HARD_INPUTS, REPO_ROOT, make_config
from benchmarks.environment import ensure_process_env


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, 10 runs: a smoke test, not figures"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="output directory (default: docs/ for a full run, a new temp dir for --quick)",
    )
    parser.add_argument("--hard-inputs", type=pathlib.Path, default=DEFAULT_HARD_INPUTS)
    # Internal: run as the jax_softmax_custom_jvp child and write JSON to this path.
    parser.add_argument("--child", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    ensure_process_env(argv)  # before anything allocates: it may re-execute this process
    args = parse_args(argv)
    config = make_config(args.quick, args.hard_inputs)

    # Imported only now, after the possible re-exec, so jax starts once per process.
    from benchmarks import custom_jvp
    from benchmarks.chart import write_chart
    from benchmarks.contenders import main_contenders
    from benchmarks.environment import describe, load_average
    from benchmarks.report import render
    from benchmarks.suite import log, run_suite
    from benchmarks.view import View

    if args.child is not None:
        custom_jvp.child_main(config, args.child)
        return

    load_at_start = load_average()
    contenders, notes, frameworks = main_contenders()
    results = run_suite(config, contenders, "main")
    results.info = describe()
    results.notes = notes + results.notes
    results.frameworks = frameworks
    results.merge(custom_jvp.run_child(config))
    results.info["load average"] = f"{load_at_start} at start, {load_average()} at end"

    out = args.out
    if out is None:
        quick_dir = tempfile.mkdtemp(prefix="stablelayers-benchmarks-")
        out = pathlib.Path(quick_dir) if args.quick else REPO_ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    view = View(results, config)
    markdown = render(view)
    (out / "benchmarks.md").write_text(markdown)
    write_chart(view, out / "benchmarks.png")
    print(markdown)
    log(f"wrote {out / 'benchmarks.md'} and {out / 'benchmarks.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
