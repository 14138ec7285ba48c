"""The attention section: causal self-attention, batch 1, bfloat16, forward and
value-and-grad of ``sum(out)`` with respect to q, k and v.

Contenders: ``stablelayers.dot_product_attention(..., is_causal=True, implementation=...)``
with ``'chunked'``, ``'dense'`` and ``'cudnn'``, and ``jax.nn.dot_product_attention`` with
``implementation='xla'`` and ``'cudnn'``. One that cannot run here (cuDNN off an NVIDIA GPU,
a dense program larger than the device's free memory) is reported ``n/a (why)``. Each group
(length, mode) runs its contenders interleaved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.accelerator_common import (
    Deadline,
    Shapes,
    blocking,
    emit,
    failure,
    temp_bytes,
    time_cases,
    too_big,
)
from benchmarks.timing import Case

CONTENDERS = (
    "stablelayers chunked",
    "stablelayers dense",
    "stablelayers cudnn",
    "jax.nn xla",
    "jax.nn cudnn",
)
MODES = ("forward", "value_and_grad")


def attend(contender: str) -> Callable[[Any, Any, Any], Any]:
    """The contender as ``f(q, k, v)``, shapes ``(batch, length, heads, dim)``."""
    import jax

    import stablelayers as sl

    library, implementation = contender.split()
    if library == "jax.nn":
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=implementation
        )
    return lambda q, k, v: sl.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation
    )


def unavailable(contender: str, platform: str) -> str | None:
    """Why the contender cannot run on this platform, known before trying it."""
    if contender.endswith("cudnn") and platform != "gpu":
        return f"n/a (cuDNN needs an NVIDIA GPU; this device is {platform})"
    return None


def _program(contender: str, mode: str, q: Any, k: Any, v: Any) -> Any:
    import jax
    import jax.numpy as jnp

    fn = attend(contender)
    if mode == "forward":
        return jax.jit(fn).lower(q, k, v).compile()

    def loss(q: Any, k: Any, v: Any) -> Any:
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    step = jax.value_and_grad(loss, argnums=(0, 1, 2))
    return jax.jit(step).lower(q, k, v).compile()


def run(sizes: Shapes, deadline: Deadline) -> None:
    """Measure every (length, mode) group and emit its rows (``kind='attention'``)."""
    import jax
    import jax.numpy as jnp

    platform = jax.devices()[0].platform
    for length in sizes.lengths:
        shape = (1, length, sizes.heads, sizes.head_dim)
        keys = jax.random.split(jax.random.key(length), 3)
        q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
        for mode in MODES:
            base = {"kind": "attention", "length": length, "mode": mode}
            if deadline.spent():
                for contender in CONTENDERS:
                    emit(**base, contender=contender, status=deadline.status())
                continue
            rows: dict[str, dict[str, Any]] = {}
            cases = []
            for contender in CONTENDERS:
                status = unavailable(contender, platform)
                program = None
                if status is None:
                    try:
                        program = _program(contender, mode, q, k, v)
                        status = too_big(program)
                    except Exception as error:  # reported as n/a, never a crash
                        status = failure(error)
                rows[contender] = {"status": status or "ok"}
                if status is None:
                    rows[contender]["temp_bytes"] = temp_bytes(program)
                    cases.append(Case(contender, blocking(program, q, k, v)))
            timed: dict[Any, tuple[float, int]] = {}
            try:
                timed = time_cases(cases, sizes)
            except Exception:
                # One contender failed at run time (out of memory, most likely): time the
                # others alone, and say which one failed.
                for case in cases:
                    try:
                        timed.update(time_cases([case], sizes))
                    except Exception as error:
                        rows[str(case.key)]["status"] = failure(error)
            for contender, row in rows.items():
                if contender in timed:
                    row["ms"], row["runs"] = timed[contender]
                emit(**base, contender=contender, **row)
