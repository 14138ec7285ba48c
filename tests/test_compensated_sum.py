"""The compensated row sums of the pure-JAX path: accuracy, and the plain sum's derivatives."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from stablelayers._core.compensated_sum import add_pair, compensated_sum, counted_sum


def _exact_row_sums(x):
    # math.fsum is exactly rounded: the reference a float pair must match.
    return np.array([math.fsum(row) for row in np.asarray(x, np.float64)])


def test_pair_holds_the_sum_to_twice_the_precision():
    rng = np.random.default_rng(0)
    # Mixed magnitudes and signs: a plain float32 sum loses several ulps here.
    x = (rng.standard_normal((16, 4096)) * np.exp(rng.uniform(-8, 8, (16, 4096)))).astype(
        np.float32
    )
    hi, lo = jax.jit(lambda x: compensated_sum(x, (1,)))(x)
    pair = np.asarray(hi, np.float64)[:, 0] + np.asarray(lo, np.float64)[:, 0]
    exact = _exact_row_sums(x)
    scale = np.abs(x.astype(np.float64)).sum(axis=1)
    assert np.all(np.abs(pair - exact) <= 4096 * 2.0**-46 * scale)
    plain = np.asarray(jnp.sum(x, axis=1), np.float64)
    assert np.max(np.abs(plain - exact) / scale) > np.max(np.abs(pair - exact) / scale)


def test_counted_sum_keeps_a_tiny_tail_to_its_own_precision():
    # A dominant row: one term of 1 and a tail of 1e-12 that 1 + tail would round away.
    rng = np.random.default_rng(1)
    e = (rng.random((4, 1024)) * 1e-14).astype(np.float32)
    e[:, 7] = 1.0
    ones, rest, rest_lo = jax.jit(lambda e: counted_sum(e, (1,)))(e)
    np.testing.assert_array_equal(ones[:, 0], 1.0)
    tail = _exact_row_sums(np.delete(e, 7, axis=1))
    got = np.asarray(rest, np.float64)[:, 0] + np.asarray(rest_lo, np.float64)[:, 0]
    np.testing.assert_allclose(got, tail, rtol=2.0**-40)


def test_non_finite_sums_have_no_error_part():
    x = np.array([[1.0, np.inf, 2.0], [1.0, np.nan, 2.0], [3.0e38, 3.0e38, 1.0]], np.float32)
    hi, lo = compensated_sum(jnp.asarray(x), (1,))
    assert np.isposinf(hi[0, 0]) and np.isnan(hi[1, 0]) and np.isposinf(hi[2, 0])
    np.testing.assert_array_equal(lo, 0.0)


@pytest.mark.parametrize("axis", [(0,), (1,), (0, 2)])
def test_shapes_and_vmap(axis):
    x = jax.random.normal(jax.random.key(0), (3, 5, 7))
    hi, lo = compensated_sum(x, axis)
    np.testing.assert_allclose(hi, jnp.sum(x, axis=axis, keepdims=True), rtol=1e-6)
    assert lo.shape == hi.shape
    batched, _ = jax.vmap(lambda x: compensated_sum(x, (0,)))(x)
    np.testing.assert_allclose(batched[:, 0], jnp.sum(x, axis=1), rtol=1e-6)


def test_derivatives_are_the_plain_sums(x64):
    x = np.random.default_rng(2).uniform(0.1, 0.9, (4, 6))

    def pair(x):
        hi, lo = compensated_sum(jnp.sin(x), (1,))
        return jnp.cos(hi + lo)

    def counted(x):
        ones, rest, rest_lo = counted_sum(x * x, (1,))
        return jnp.cos(ones + rest + rest_lo)

    for f in (pair, counted):
        check_grads(f, (x,), order=2, modes=["fwd", "rev"])
        assert jax.hessian(lambda x, f=f: jnp.sum(f(x)))(x).shape == (4, 6, 4, 6)


def test_add_pair_is_exact_and_differentiates_as_a_sum(x64):
    hi, lo = add_pair(jnp.float64(1.0), jnp.float64(0.0), jnp.float64(2.0**-60))
    assert float(hi) == 1.0 and float(lo) == 2.0**-60
    grad = jax.grad(lambda a, b: sum(add_pair(a, jnp.float64(0.0), b)), argnums=(0, 1))
    assert grad(jnp.float64(1.0), jnp.float64(2.0)) == (1.0, 1.0)
