"""PyTorch (CPU), when it is installed: an optional contender, never a dependency."""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable

import numpy as np

from benchmarks.contender import FORWARD
from benchmarks.inputs import Inputs


def torch_available() -> bool:
    """Whether ``import torch`` can work, without paying for the import."""
    return importlib.util.find_spec("torch") is not None


class TorchContender:
    """``torch.softmax``, ``torch.log_softmax`` and ``torch.nn.functional.softplus`` (its
    defaults: beta 1, threshold 20) over the last axis, eager, float32, CPU."""

    name = "torch"
    ops = ("softmax", "log_softmax", "softplus")

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._functions = {
            "softmax": lambda x: torch.softmax(x, dim=-1),
            "log_softmax": lambda x: torch.log_softmax(x, dim=-1),
            "softplus": torch.nn.functional.softplus,
        }

    def timed_call(self, op: str, mode: str, inputs: Inputs) -> Callable[[], None]:
        torch, fn = self._torch, self._functions[op]
        arg_sets = [
            (x.detach().requires_grad_(mode != FORWARD), w)
            for x, w, _ in inputs.torch_placements
        ]
        calls = itertools.count()
        if mode == FORWARD:

            def forward() -> None:
                x, _ = arg_sets[next(calls) % len(arg_sets)]
                with torch.no_grad():
                    fn(x)

            return forward

        def value_and_grad() -> None:
            leaf, w = arg_sets[next(calls) % len(arg_sets)]
            # autograd.grad returns the gradient instead of accumulating into leaf.grad, so
            # every run does the same work.
            loss = torch.sum(fn(leaf) * w)
            torch.autograd.grad(loss, leaf)

        return value_and_grad

    def temp_bytes(self, op: str, inputs: Inputs) -> int | None:
        return None  # eager torch has no compiled program to ask

    def residual_bytes(self, op: str, inputs: Inputs) -> int:
        # saved_tensors_hooks sees every tensor autograd saves. Only f(x) runs under the
        # hook: the `* w` of the loss would add w, which no JAX figure counts either.
        torch = self._torch
        saved: dict[tuple, int] = {}

        def pack(t):
            saved[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
            return t

        leaf = inputs.torch[0].detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._functions[op](leaf)
        return int(sum(saved.values()))

    def forward(self, op: str, x: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            return self._functions[op](self._torch.from_numpy(x)).numpy()

    def gradient(self, op: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        torch = self._torch
        leaf = torch.from_numpy(x).requires_grad_(True)
        loss = torch.sum(self._functions[op](leaf) * torch.from_numpy(w))
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad.numpy()
