"""One test per defect an outside probe found (issue 14), each named after it. Every test
here failed on the code the probe ran against."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablelayers as sl

X32 = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.float32)


# Defect 3: softplus crashed under jax_enable_x64 with float32 or bfloat16 input on the
# pure-JAX path (a shift by an int64 literal in the float32 exp).
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
def test_defect_3_softplus_runs_under_x64(dtype, call):
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


def test_defect_3_learnable_equinox_softplus_runs_under_x64():
    eqx_layers = pytest.importorskip("stablelayers.equinox")
    with jax.enable_x64(True):
        layer = eqx_layers.Softplus(beta=2.0, learnable=True)
        y = layer(X32)
        grads = jax.grad(lambda m: m(X32).sum())(layer)
    assert y.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(y)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


# Defect 4 (softplus): an infinite beta was accepted and gave NaN; beta * x overflowing
# gave inf instead of x.
@pytest.mark.parametrize(
    "beta", [float("inf"), np.float32(np.inf), jnp.inf, np.float64(-1.0), jnp.float32(0.0)]
)
def test_defect_4_non_finite_or_non_positive_beta_is_rejected(beta):
    with pytest.raises(ValueError, match="positive and finite"):
        sl.softplus(X32, beta)


@pytest.mark.parametrize("path", ["kernels", "pure_jax"])
@pytest.mark.parametrize("beta", [2.0, jnp.float32(2.0)], ids=["python-beta", "array-beta"])
def test_defect_4_softplus_where_beta_times_x_overflows_is_x(path, beta):
    x = jnp.array([2e38, 3.4e38, -3.4e38, 1e30], jnp.float32)
    with sl.pure_jax() if path == "pure_jax" else _nothing():
        y = jax.jit(lambda x: sl.softplus(x, beta))(x)
        g = jax.jit(jax.grad(lambda x: sl.softplus(x, beta).sum()))(x)
    np.testing.assert_array_equal(y, np.float32([2e38, 3.4e38, 0.0, 1e30]))
    np.testing.assert_array_equal(g, [1.0, 1.0, 0.0, 1.0])


# Defect 6 (dtypes): under x64, integer inputs came back float64 where jax.nn gives float32.
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.int32])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "softplus"])
def test_defect_6_integer_inputs_take_jax_nn_dtype_under_x64(name, dtype):
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


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False
