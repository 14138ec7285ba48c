"""The ops section: forward and value-and-grad of each stablelayers op with a jax.nn peer,
against that peer and against the device's copy bandwidth, float32 and bfloat16.

Value-and-grad is of ``sum(f(x) * w)`` with respect to ``x``, ``w`` a cotangent of
``f(x)``'s shape (as in ``benchmarks.jax_contender``). The bandwidth references are
``benchmarks.timing``'s kernels: ``copy`` (``y = 2 x``: read x, write y, the least a
forward pass must move) for the forward pass and ``axpy`` (``2 x + w``: two reads, one
write, the least a value-and-grad moves) for value-and-grad; XLA cannot elide either.
Each group (op, dtype, mode) runs its two contenders and its reference interleaved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.accelerator_common import (
    Deadline,
    Shapes,
    blocking,
    bytes_accessed,
    emit,
    failure,
    time_cases,
    too_big,
)
from benchmarks.timing import BOUND_KERNELS, BOUND_OF_MODE, Case

OPS = ("softmax", "log_softmax", "logsumexp", "softplus", "sigmoid", "log_sigmoid")
DTYPES = ("float32", "bfloat16")
MODES = ("forward", "value_and_grad")
CONTENDERS = ("stablelayers", "jax.nn")


def functions(op: str) -> dict[str, Callable[[Any], Any]]:
    """``contender -> f(x)`` over the last axis (logsumexp's default axis is all of them)."""
    import jax

    import stablelayers as sl

    if op == "logsumexp":
        return {
            "stablelayers": lambda x: sl.logsumexp(x, axis=-1),
            "jax.nn": lambda x: jax.nn.logsumexp(x, axis=-1),
        }
    return {"stablelayers": getattr(sl, op), "jax.nn": getattr(jax.nn, op)}


def _program(fn: Callable[[Any], Any], mode: str, x: Any) -> tuple[Any, tuple[Any, ...]]:
    """The compiled program of ``fn`` in ``mode``, and the arguments it takes."""
    import jax
    import jax.numpy as jnp

    if mode == "forward":
        return jax.jit(fn).lower(x).compile(), (x,)
    out = jax.eval_shape(fn, x)
    w = jnp.ones(out.shape, out.dtype) * jnp.asarray(0.5, out.dtype)

    def loss(x: Any, w: Any) -> Any:
        return jnp.sum(fn(x) * w)

    return jax.jit(jax.value_and_grad(loss)).lower(x, w).compile(), (x, w)


def run(sizes: Shapes, deadline: Deadline, ops: tuple[str, ...] = OPS) -> None:
    """Measure every (op, dtype, mode) group and emit its rows (``kind='ops'``)."""
    import jax
    import jax.numpy as jnp

    for dtype in DTYPES:
        key = jax.random.key(0)
        x = jax.random.normal(key, sizes.ops, jnp.float32).astype(dtype)
        w = jax.random.normal(jax.random.fold_in(key, 1), sizes.ops, jnp.float32).astype(dtype)
        nbytes = x.size * x.dtype.itemsize
        for mode in MODES:
            bound = BOUND_OF_MODE[mode]
            bound_call = None
            for op in ops:
                base = {"kind": "ops", "op": op, "dtype": dtype, "mode": mode}
                if deadline.spent():
                    for contender in (*CONTENDERS, bound):
                        emit(**base, contender=contender, status=deadline.status())
                    continue
                if bound_call is None:  # compiled once per (dtype, mode), timed each group
                    bound_program = jax.jit(BOUND_KERNELS[bound]).lower(x, w).compile()
                    bound_call = blocking(bound_program, x, w)
                cases = [Case(bound, bound_call)]
                rows: dict[str, dict[str, Any]] = {}
                for contender, fn in functions(op).items():
                    try:
                        program, args = _program(fn, mode, x)
                        status = too_big(program)
                    except Exception as error:  # reported as n/a, never a crash
                        status = failure(error)
                    rows[contender] = {"status": status or "ok"}
                    if status is None:
                        rows[contender]["bytes_accessed"] = bytes_accessed(program)
                        cases.append(Case(contender, blocking(program, *args)))
                try:
                    timed = time_cases(cases, sizes)
                except Exception as error:
                    timed = {}
                    for row in rows.values():
                        row["status"] = failure(error)
                for contender, row in rows.items():
                    if contender in timed:
                        row["ms"], row["runs"] = timed[contender]
                    emit(**base, contender=contender, **row)
                if bound in timed:
                    ms, runs = timed[bound]
                    # copy moves 2 arrays of x's size, axpy 3.
                    moved = nbytes * (2 if bound == "copy" else 3)
                    gbps = moved / (ms * 1e-3) / 1e9
                    emit(**base, contender=bound, status="ok", ms=ms, runs=runs, gbps=gbps)
                else:
                    emit(**base, contender=bound, status="n/a (the timing failed)")
