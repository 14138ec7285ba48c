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


X32 = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.float32)


# softplus once crashed under jax_enable_x64 with float32 or bfloat16 input on the pure-JAX
# path (a shift by an int64 literal in the float32 exp).
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "call",
    [
        lambda x: sl.softplus(x, jnp.float32(2.0)),
        lambda x: sl.softplus(x, jnp.full(x.shape, 0.5, jnp.float32)),
        lambda x: jax.grad(lambda b: sl.softplus(x, b).astype(jnp.float32).sum())(
            jnp.float32(1.5)
        ),
    ],
    ids=["array-beta", "per-entry-beta", "learnable-beta-gradient"],
)
def test_softplus_keeps_float32_and_bfloat16_under_x64(dtype, call):
    with jax.enable_x64(True):
        x = X32.astype(dtype)
        result = call(x)
        with sl.pure_jax():
            pure = sl.softplus(x)
        with sl.forward_mode():
            tangent = jax.jvp(sl.softplus, (x,), (jnp.ones_like(x),))[1]
    assert np.all(np.isfinite(np.asarray(result, np.float32)))
    expected = np.log1p(np.exp(np.asarray(x, np.float64)))
    np.testing.assert_allclose(np.asarray(pure, np.float64), expected, rtol=1e-2)
    assert pure.dtype == dtype and tangent.dtype == dtype


# Under x64, integer inputs once came back float64 where jax.nn gives float32.
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.int32])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "softplus"])
def test_integer_inputs_take_jax_nn_dtype_under_x64(name, dtype):
    with jax.enable_x64(True):
        x = jnp.arange(4).astype(dtype)
        ours = getattr(sl, name)(x)
        # Only its dtype; jax.nn warns while tracing integer log_softmax (-inf cast to int).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            theirs = jax.eval_shape(getattr(jax.nn, name), x)
        wide = getattr(sl, name)(jnp.arange(4, dtype=jnp.int64))
        boolean = getattr(sl, name)(jnp.array([True, False]))
    assert ours.dtype == theirs.dtype == jnp.float32
    assert wide.dtype == jnp.float64
    # jax.dtypes' rule for booleans (jax.nn.softmax refuses them).
    assert boolean.dtype == jnp.float32
