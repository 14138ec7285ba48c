"""Benchmark inputs, built once per shape and shared by every contender."""

from __future__ import annotations

import functools

import numpy as np


class Inputs:
    """A float32 ``x`` and cotangent ``w`` of one shape, as numpy, JAX and torch arrays.

    The JAX and torch copies are made on first use and then shared, so four contenders do not
    hold four copies of a 256 MiB input.
    """

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        # Standard normal logits: a row of 1024-4096 of them spans e^-8 or so, so no exp
        # underflows to a subnormal (which would time the CPU's subnormal handling instead).
        self.shape = shape
        self.x = rng.standard_normal(shape, dtype=np.float32)
        self.w = rng.standard_normal(shape, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of one array of ``x``'s size: the unit of the bandwidth and memory models."""
        return self.x.nbytes

    @functools.cached_property
    def jax(self) -> tuple:
        """``(x, w)`` as JAX arrays on the default device."""
        import jax

        return jax.device_put(self.x), jax.device_put(self.w)

    @functools.cached_property
    def torch(self) -> tuple:
        """``(x, w)`` as torch CPU tensors (sharing the numpy buffers)."""
        import torch

        return torch.from_numpy(self.x), torch.from_numpy(self.w)
