"""logsumexp's call forms as JAX and SciPy take them: ``b`` broadcast together with ``a``,
and complex input computed as ``jax.nn.logsumexp`` does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import stablelayers as sl


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "axis"),
    [((4,), (3, 4), None), ((4,), (3, 4), 1), ((3, 1), (1, 4), 0), ((2, 3), (3,), -1)],
)
def test_b_broadcasts_together_with_a_as_scipy(a_shape, b_shape, axis):
    rng = np.random.default_rng(0)
    a = rng.normal(size=a_shape).astype(np.float32)
    b = rng.uniform(0.5, 2.0, size=b_shape).astype(np.float32)
    expected = scipy.special.logsumexp(a.astype(np.float64), axis=axis, b=b)
    np.testing.assert_allclose(sl.logsumexp(a, axis=axis, b=b), expected, rtol=1e-6)
    grads = jax.grad(lambda a, b: sl.logsumexp(a, axis=axis, b=b).sum(), (0, 1))(a, b)
    # jax.nn.logsumexp broadcasts implicitly, which the suite's rank-promotion setting
    # refuses; stablelayers broadcasts explicitly.
    with jax.numpy_rank_promotion("allow"):
        np.testing.assert_allclose(
            sl.logsumexp(a, axis=axis, b=b), jax.nn.logsumexp(a, axis=axis, b=b), rtol=1e-6
        )
        peer = jax.grad(lambda a, b: jax.nn.logsumexp(a, axis=axis, b=b).sum(), (0, 1))(a, b)
    for got, want in zip(grads, peer, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_b_that_does_not_broadcast_is_refused():
    with pytest.raises(ValueError, match="does not broadcast"):
        sl.logsumexp(np.zeros(4), b=np.ones(3))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"axis": 1},
        {"axis": 1, "keepdims": True},
        {"axis": 0, "b": "b"},
        {"axis": 1, "b": "b", "return_sign": True},
        {"axis": 1, "where": "where"},
    ],
)
def test_complex_input_as_jax_nn(kw):
    rng = np.random.default_rng(1)
    a = (rng.normal(size=(2, 3)) + 1j * rng.normal(size=(2, 3))).astype(np.complex64)
    extra = {
        "b": rng.normal(size=(2, 3)).astype(np.float32),
        "where": np.array([[True, False, True], [True, True, False]]),
    }
    kw = {k: extra[v] if isinstance(v, str) else v for k, v in kw.items()}
    got, want = sl.logsumexp(a, **kw), jax.nn.logsumexp(a, **kw)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_complex_logsumexp_is_holomorphic_and_matches_scipy(x64):
    rng = np.random.default_rng(2)
    a = rng.normal(size=5) + 1j * rng.normal(size=5)
    np.testing.assert_allclose(sl.logsumexp(a), scipy.special.logsumexp(a), rtol=1e-12)
    # d lse / d a_j = softmax_j: the holomorphic derivative.
    grad = jax.grad(sl.logsumexp, holomorphic=True)(jnp.asarray(a))
    np.testing.assert_allclose(grad, np.exp(a - scipy.special.logsumexp(a)), rtol=1e-12)
    big = a + 1000.0  # no overflow: the shift is the real part's max
    np.testing.assert_allclose(sl.logsumexp(big), scipy.special.logsumexp(a) + 1000.0)
