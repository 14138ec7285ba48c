"""jax.nn.softmax with ``jax_softmax_custom_jvp=True``, measured in a child process.

The flag picks which softmax jax.nn traces, for the whole process, so it gets a process of
its own. The child times stablelayers' softmax next to it, interleaved, and the report
takes the ratio between those two: timings from different processes are never divided.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

from benchmarks.config import REPO_ROOT, Config
from benchmarks.results import Results

NAME = "jax.nn custom_jvp"
PROCESS = "custom_jvp"
# The only op the flag changes: jax.nn.softmax reads it; log_softmax and softplus do not.
OPS = ("softmax",)


def run_child(config: Config) -> Results:
    """Run ``python -m benchmarks --child`` with the same configuration; return its results,
    or empty results with a note saying why there are none."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "custom_jvp.json"
        command = [sys.executable, "-m", "benchmarks", "--child", str(path), *config.to_args()]
        # The parent already runs under the malloc settings; the child inherits them.
        done = subprocess.run(command, cwd=REPO_ROOT, env=os.environ.copy(), check=False)
        if done.returncode != 0 or not path.exists():
            return Results(
                notes=[f"`{NAME}` not measured: its process exited {done.returncode}."]
            )
        return Results.load(path)


def child_main(config: Config, path: pathlib.Path) -> None:
    """The child's whole job: set the flag, measure, and write JSON to ``path``."""
    import jax

    from benchmarks.contenders import jax_nn_contender, stablelayers_contender
    from benchmarks.suite import run_suite

    jax.config.update("jax_softmax_custom_jvp", True)
    # Make sure the flag still does something, so the row is never a relabelled jax.nn.
    jaxpr = str(jax.make_jaxpr(jax.nn.softmax)(jax.numpy.ones((2, 3))))
    if "custom_jvp_call" not in jaxpr:
        Results(notes=[f"`{NAME}`: the flag no longer changes jax.nn.softmax."]).save(path)
        return
    contenders = [stablelayers_contender(OPS), jax_nn_contender(NAME, OPS)]
    results = run_suite(config, contenders, PROCESS)
    # The stablelayers timings are the anchor of the ratio; its memory and accuracy are
    # already in the main process's results.
    results.memory = [m for m in results.memory if m.contender == NAME]
    results.accuracy = [a for a in results.accuracy if a.contender == NAME]
    results.save(path)
