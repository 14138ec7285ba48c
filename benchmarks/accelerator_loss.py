"""The loss section: value-and-grad (with respect to hidden and weight) of the mean
cross-entropy of ``hidden @ weight``, bfloat16 inputs, one contender per process so that
each peak is its own.

``fused`` is ``stablelayers.linear_softmax_cross_entropy(hidden, weight, labels,
reduction='mean')``, which never forms the ``(tokens, vocab)`` logits; ``optax`` forms
them in float32 (``jnp.matmul(..., preferred_element_type=float32)``, as
``benchmarks.losses`` does) and takes ``optax.softmax_cross_entropy_with_integer_labels``.

Peak memory is ``memory_stats()['peak_bytes_in_use']`` of the device where it has
allocator statistics (GPU, TPU): inputs included, and ``above inputs`` less what was in
use once the inputs were made. The CPU has none; there the figure is the compiled
program's ``memory_analysis().temp_size_in_bytes``, a plan rather than a measurement, and
the record says which it is.
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

CONTENDERS = ("fused", "optax")


def loss_fn(contender: str) -> Callable[[Any, Any, Any], Any]:
    import jax.numpy as jnp
    import optax

    import stablelayers as sl

    if contender == "fused":
        return lambda h, w, y: sl.linear_softmax_cross_entropy(h, w, y, reduction="mean")

    def materialised(h: Any, w: Any, y: Any) -> Any:
        logits = jnp.matmul(h, w, preferred_element_type=jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return materialised


def _in_use() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def run(sizes: Shapes, deadline: Deadline, contender: str) -> None:
    """Measure one contender in this process and emit its row (``kind='loss'``)."""
    import jax
    import jax.numpy as jnp

    base = {"kind": "loss", "contender": contender}
    if deadline.spent():
        emit(**base, status=deadline.status())
        return
    tokens, hidden, vocab = sizes.loss
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (tokens, hidden), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (hidden, vocab)) / hidden**0.5).astype(jnp.bfloat16)
    y = jax.random.randint(keys[2], (tokens,), 0, vocab)
    jax.block_until_ready((h, w, y))
    inputs_in_use = _in_use()
    try:
        step = jax.jit(jax.value_and_grad(loss_fn(contender), argnums=(0, 1)))
        program = step.lower(h, w, y).compile()
        status = too_big(program)
    except Exception as error:  # reported as n/a, never a crash
        emit(**base, status=failure(error))
        return
    if status is not None:
        emit(**base, status=status)
        return
    temp = temp_bytes(program)
    try:
        ms, runs = time_cases([Case(contender, blocking(program, h, w, y))], sizes)[contender]
    except Exception as error:
        emit(**base, status=failure(error), temp_bytes=temp)
        return
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak, source = int(stats["peak_bytes_in_use"]), "memory_stats"
    else:
        peak, source = temp, "temp_size_in_bytes"
    emit(
        **base,
        status="ok",
        ms=ms,
        runs=runs,
        peak_bytes=peak,
        peak_source=source,
        inputs_bytes=inputs_in_use,
        temp_bytes=temp,
    )
