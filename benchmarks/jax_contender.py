"""Contenders written in JAX: stablelayers, jax.nn, and anything else with the same ops."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.contender import FORWARD, VALUE_AND_GRAD
from benchmarks.inputs import Inputs


def _loss(fn: Callable) -> Callable:
    # w is an argument, not a closure: a closed-over array would be baked into the program
    # as a constant, and XLA could fold work into it.
    return lambda x, w: jnp.sum(fn(x) * w)


class JaxContender:
    """A set of JAX functions ``op name -> f(x)``, each applied over the last axis.

    Timing and temp bytes use the same ahead-of-time compiled executable, so what is timed is
    exactly what ``memory_analysis`` describes, and no retracing can sneak into a timed run.
    """

    def __init__(self, name: str, functions: dict[str, Callable]) -> None:
        self.name = name
        self.functions = functions
        self.ops = tuple(functions)
        self._cache: dict[tuple, jax.stages.Compiled] = {}

    def _compiled(self, op: str, mode: str, shape: tuple[int, ...]) -> jax.stages.Compiled:
        key = (op, mode, shape)
        if key not in self._cache:
            fn = self.functions[op]
            spec = jax.ShapeDtypeStruct(shape, jnp.float32)
            if mode == FORWARD:
                self._cache[key] = jax.jit(fn).lower(spec).compile()
            else:
                loss_and_grad = jax.jit(jax.value_and_grad(_loss(fn)))
                self._cache[key] = loss_and_grad.lower(spec, spec).compile()
        return self._cache[key]

    def timed_call(self, op: str, mode: str, inputs: Inputs) -> Callable[[], None]:
        compiled = self._compiled(op, mode, inputs.shape)
        arg_sets = [(x,) if mode == FORWARD else (x, w) for x, w, _ in inputs.jax_placements]
        calls = itertools.count()

        def call() -> None:
            # Returning nothing frees the outputs at once, so the next case reuses the memory.
            jax.block_until_ready(compiled(*arg_sets[next(calls) % len(arg_sets)]))

        return call

    def temp_bytes(self, op: str, inputs: Inputs) -> int | None:
        analysis = self._compiled(op, VALUE_AND_GRAD, inputs.shape).memory_analysis()
        return None if analysis is None else int(analysis.temp_size_in_bytes)

    def residual_bytes(self, op: str, inputs: Inputs) -> int:
        # The function jax.vjp returns is a pytree whose leaves are the residuals. One array
        # can appear twice; it is held once. The input itself counts when it is a leaf: the
        # backward pass keeps it alive.
        x, _ = inputs.jax
        _, vjp_fn = jax.vjp(self.functions[op], x)
        leaves = {id(leaf): leaf for leaf in jax.tree_util.tree_leaves(vjp_fn)}
        return int(sum(getattr(leaf, "nbytes", 0) for leaf in leaves.values()))

    def forward(self, op: str, x: np.ndarray) -> np.ndarray:
        return np.asarray(jax.jit(self.functions[op])(x))

    def gradient(self, op: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.asarray(jax.jit(jax.grad(_loss(self.functions[op])))(x, w))
