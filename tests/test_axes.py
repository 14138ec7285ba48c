"""``axis`` as jax.nn takes it: an int, a tuple of ints, or ``None`` for every axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablelayers as sl

X = jnp.arange(24.0).reshape(2, 3, 4) / 7


@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None])
@pytest.mark.parametrize(
    "op, reference",
    [
        (sl.softmax, jax.nn.softmax),
        (sl.masked_softmax, jax.nn.softmax),
        (sl.log_softmax, jax.nn.log_softmax),
    ],
)
def test_axis_matches_jax_nn(op, reference, axis):
    np.testing.assert_allclose(op(X, axis=axis), reference(X, axis=axis), rtol=1e-6)


def test_layers_take_axis_none():
    pytest.importorskip("equinox")
    import stablelayers.equinox as sleqx

    np.testing.assert_allclose(
        sleqx.Softmax(axis=None)(X), jax.nn.softmax(X, axis=None), rtol=1e-6
    )
