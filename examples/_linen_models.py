"""The classifier's model in Flax Linen, built from ``stablelayers.linen`` layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

import stablelayers.linen as sl
from _train import Model


class MLP(nn.Module):
    """Dense layers with learnable-temperature ``Softplus`` between them; the output is a
    log-probability per class (``LogSoftmax``)."""

    sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for size in self.sizes[1:-1]:
            x = sl.Softplus(beta=1.0, learnable=True)(nn.Dense(size)(x))
        return sl.LogSoftmax()(nn.Dense(self.sizes[-1])(x))


def mlp(sizes: tuple[int, ...], seed: int) -> Model:
    module = MLP(sizes)
    params = module.init(jax.random.key(seed), jnp.zeros((1, sizes[0])))
    return Model(params, module.apply)
