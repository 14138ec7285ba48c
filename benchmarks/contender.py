"""What every contender provides, whichever library runs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from benchmarks.inputs import Inputs

FORWARD = "forward"
VALUE_AND_GRAD = "value_and_grad"
MODES = (FORWARD, VALUE_AND_GRAD)


class Contender(Protocol):
    """One implementation of some of the ops, measured on the same inputs as the others.

    Value-and-grad always means the value and the gradient with respect to ``x`` of
    ``sum(f(x) * w)``, with ``w`` a fixed cotangent of ``x``'s shape.
    """

    name: str
    ops: tuple[str, ...]

    def timed_call(self, op: str, mode: str, inputs: Inputs) -> Callable[[], None]:
        """A ready-to-time call (compiled, warm) that runs ``op`` once and waits for it."""
        ...

    def temp_bytes(self, op: str, inputs: Inputs) -> int | None:
        """Scratch bytes the compiled value-and-grad needs, or None if not known."""
        ...

    def residual_bytes(self, op: str, inputs: Inputs) -> int:
        """Bytes the forward pass keeps alive for the backward pass."""
        ...

    def forward(self, op: str, x: np.ndarray) -> np.ndarray:
        """``f(x)`` in float32, as numpy."""
        ...

    def gradient(self, op: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The gradient of ``sum(f(x) * w)`` with respect to ``x``, as numpy."""
        ...
