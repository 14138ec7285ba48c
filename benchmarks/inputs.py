"""Benchmark inputs, built once per shape and shared by every contender."""

from __future__ import annotations

import functools

import numpy as np

# Copies of the inputs at different addresses. How fast a pass over x runs depends on where
# its buffers sit relative to each other (modulo the 4 KiB page, loads and stores that look
# alike to the CPU stall each other): `python -m benchmarks.placement` times one op over
# copies of the same x, and its medians differ steadily from copy to copy.
# Timed calls cycle through the copies, so a median is over placements, not one draw.
# Inputs above 64 MiB get one copy: with glibc told never to give memory back (see
# benchmarks.environment), three copies of the 256 MiB inputs fragmented the heap past this
# machine's 24 GiB.
PLACEMENTS = 3
MAX_PLACED_BYTES = 64 * 2**20


class Inputs:
    """A float32 ``x`` and cotangent ``w`` of one shape, as numpy, JAX and torch arrays.

    The JAX and torch copies are made on first use and then shared, so four contenders do not
    hold four sets of copies of a 256 MiB input.
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

    @property
    def jax(self) -> tuple:
        """``(x, w)`` as JAX arrays on the default device (the first placement)."""
        return self.jax_placements[0][:2]

    @property
    def torch(self) -> tuple:
        """``(x, w)`` as torch CPU tensors (the first placement)."""
        return self.torch_placements[0][:2]

    @functools.cached_property
    def jax_placements(self) -> list[tuple]:
        """``(x, w, pad)`` tuples of JAX arrays, each at a different address."""
        import jax
        import jax.numpy as jnp

        return self._placements(jax.device_put, lambda a: jnp.array(a, copy=True))

    @functools.cached_property
    def torch_placements(self) -> list[tuple]:
        """``(x, w, pad)`` tuples of torch CPU tensors, each at a different address."""
        import torch

        return self._placements(
            torch.from_numpy, lambda a: torch.from_numpy(np.array(a, copy=True))
        )

    def _placements(self, share, copy) -> list[tuple]:
        # After each copy, a small allocation of a different size moves the next big buffer
        # along. The pads ride along as a third element, so they live as long as the copies
        # do and are never freed and reused in between. Large inputs get one shared copy.
        if self.x.nbytes > MAX_PLACED_BYTES:
            return [(share(self.x), share(self.w), None)]
        pads = (np.zeros(1 + 700 * i, np.float32) for i in range(PLACEMENTS))
        return [(copy(self.x), copy(self.w), copy(pad)) for pad in pads]
