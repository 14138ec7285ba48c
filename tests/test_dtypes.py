"""Half precision computes in float32 and returns its own dtype; integers are promoted."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablelayers as sl

OPS = [sl.softmax, sl.log_softmax, sl.masked_softmax, sl.softplus]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("op", OPS)
def test_dtype_in_dtype_out(op, dtype):
    x = (jax.random.normal(jax.random.key(0), (3, 7)) * 4).astype(dtype)
    y = op(x)
    assert y.dtype == dtype
    want = op(x.astype(jnp.float32)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
    g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(op(x)), op(x), 0)))(x)
    assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_float16_sum_over_65536_equal_logits_does_not_overflow():
    x = jnp.zeros(65536, jnp.float16)
    y = sl.softmax(x)
    assert y.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(y, np.float32), 1 / 65536, rtol=1e-3)
    np.testing.assert_allclose(
        np.asarray(sl.log_softmax(x), np.float32), -np.log(65536), rtol=1e-3
    )


def test_float16_large_logits():
    x = jnp.array([60000.0, 59968.0, -60000.0], jnp.float16)  # 32 apart
    y = sl.softmax(x)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert float(y[0]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("op", OPS)
def test_integers_are_promoted_like_jax_nn(op):
    x = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    y = op(x)
    assert jnp.issubdtype(y.dtype, jnp.floating)
    reference = {
        sl.softmax: jax.nn.softmax,
        sl.masked_softmax: jax.nn.softmax,
        sl.log_softmax: jax.nn.log_softmax,
        sl.softplus: jax.nn.softplus,
    }[op]
    # jax.nn.log_softmax warns while tracing an integer input (a -inf cast to int).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert y.dtype == jax.eval_shape(reference, x).dtype
    np.testing.assert_allclose(y, reference(x.astype(y.dtype)), rtol=1e-6)


def test_float64(x64):
    x = jax.random.normal(jax.random.key(0), (3, 7), jnp.float64) * 10
    for op in OPS:
        assert op(x).dtype == jnp.float64
    np.testing.assert_allclose(sl.softmax(x), jax.nn.softmax(x), rtol=1e-13)


def test_python_lists_and_scalars():
    np.testing.assert_allclose(sl.softmax([0.0, 1.0, 2.0]), jax.nn.softmax(jnp.arange(3.0)))
    assert sl.softplus(0.0) == pytest.approx(np.log(2))
