"""stablelayers.logsumexp: jax.nn.logsumexp's signature and semantics, accurate values
(Blanchard-Higham-Higham), a softmax-weighted gradient, nothing from masked entries."""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import stablelayers as sl
from tests._ulp import ulp_error

SETS = ["normal_x1", "normal_x30", "normal_x1000", "normal_x10000", "f32max_mix", "dominant"]


def _reference(x: np.ndarray) -> np.ndarray:
    # max + log1p(sum of exp(x_j - max) without the arg-max), in float64: its own error
    # (~1e-16 relative) is far below a float32 ULP.
    x = x.astype(np.float64)
    k = np.argmax(x, axis=-1)
    m = x[np.arange(len(x)), k]
    e = np.exp(x - m[:, None])
    e[np.arange(len(x)), k] = 0.0
    return m + np.log1p(e.sum(axis=-1))


@pytest.mark.parametrize("name", SETS)
def test_hard_inputs_within_2_ulp(hard_inputs, name):
    x = hard_inputs[f"{name}/x"]
    worst, non_finite = ulp_error(jax.jit(lambda x: sl.logsumexp(x, axis=-1))(x), _reference(x))
    assert non_finite == 0
    assert worst <= 2.0, worst


def test_float64_reference_agrees_with_mpmath(hard_inputs):
    x = hard_inputs["dominant/x"][:2, :64].astype(np.float64)
    with mpmath.workdps(40):
        exact = [
            float(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row))) for row in x
        ]
    np.testing.assert_allclose(_reference(x), exact, rtol=1e-15)


def test_dominant_row_keeps_its_tail():
    x = jnp.array([0.0, -30.0, -30.0], jnp.float32)
    assert float(sl.logsumexp(x)) == pytest.approx(2 * np.exp(-30.0), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"axis": -1},
        {"axis": 0, "keepdims": True},
        {"axis": (0, 2)},
        {"axis": -1, "where": np.arange(5) % 2 == 0},
        {"axis": -1, "b": np.array([1.0, 2.0, 0.0, 0.5, 3.0], np.float32)},
        {"axis": -1, "b": np.array([1, -2, 0, 0.5, 3], np.float32), "return_sign": True},
        {"axis": 1, "b": np.float32(-1.0)},
    ],
)
def test_matches_jax_nn(kwargs):
    x = jax.random.normal(jax.random.key(1), (3, 4, 5)) * 3
    got = sl.logsumexp(x, **kwargs)
    with jax.numpy_rank_promotion("allow"):  # the reference's own broadcasts of b, where
        want = jax.nn.logsumexp(x, **kwargs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-6)


def test_special_rows():
    x = jnp.array([[1.0, jnp.inf, 0.0], [-jnp.inf, -jnp.inf, -jnp.inf], [1.0, jnp.nan, 0.0]])
    np.testing.assert_array_equal(sl.logsumexp(x, axis=-1), [jnp.inf, -jnp.inf, jnp.nan])


def test_fully_masked_row_is_minus_inf_with_zero_gradient():
    x = jnp.array([[1.0, jnp.nan, jnp.inf], [1.0, 2.0, 3.0]])
    where = jnp.array([[False, False, False], [True, False, True]])
    value = sl.logsumexp(x, axis=-1, where=where)
    assert value[0] == -jnp.inf
    live = where.any(-1)
    grad = jax.grad(lambda x: jnp.sum(jnp.where(live, sl.logsumexp(x, -1, where=where), 0)))(x)
    np.testing.assert_array_equal(grad[0], 0.0)
    assert grad[1, 1] == 0.0
    np.testing.assert_allclose(grad[1].sum(), 1.0, rtol=1e-6)


@settings(deadline=None, max_examples=25)
@given(
    hnp.arrays(np.float32, (3, 6), elements=st.floats(-50, 50, width=32)),
    hnp.arrays(bool, (3, 6)),
)
def test_masked_entries_contribute_nothing(x, where):
    poisoned = np.where(where, x, np.nan).astype(np.float32)
    f = lambda x: sl.logsumexp(x, axis=-1, where=where)  # noqa: E731
    np.testing.assert_array_equal(f(x), f(poisoned))
    live = where.any(-1)
    loss = lambda x: jnp.sum(jnp.where(live, f(x), 0.0))  # noqa: E731
    grad = jax.grad(loss)(poisoned)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.where(where, 0.0, grad), 0.0)
    np.testing.assert_array_equal(grad, jax.grad(loss)(x))


def test_gradients_against_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
        where = rng.random((3, 5)) < 0.8
        # jit: one compile per transformation instead of one per eager op.
        check_grads(jax.jit(lambda x: sl.logsumexp(x, axis=-1, where=where)), (x,), 2, ["rev"])
        check_grads(jax.jit(lambda x: sl.logsumexp(x, axis=None)), (x,), 2, ["rev"])
        f = jax.jit(lambda x, b: sl.logsumexp(x, axis=-1, b=b, return_sign=True)[0])
        check_grads(f, (x, b), 2, ["rev"])
        with sl.forward_mode():
            check_grads(jax.jit(lambda x: sl.logsumexp(x, axis=-1)), (x,), 2, ["fwd", "rev"])


def test_transforms():
    x = jax.random.normal(jax.random.key(2), (4, 6))
    f = lambda x: sl.logsumexp(x, axis=-1)  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(x), jax.vmap(f)(x), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: f(x).sum()))(x)
    np.testing.assert_allclose(grad, jax.nn.softmax(x), rtol=1e-5)
    h = jax.jit(jax.hessian(lambda r: sl.logsumexp(r)))(x[0])
    p = jax.nn.softmax(x[0])
    np.testing.assert_allclose(h, np.diag(p) - np.outer(p, p), atol=1e-6)
    with sl.forward_mode():
        jac = jax.jit(jax.jacfwd(lambda r: sl.logsumexp(r)))(x[0])
        np.testing.assert_allclose(jac, p, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_in_float32(dtype):
    x = jax.random.normal(jax.random.key(3), (4, 64)).astype(dtype) * 8
    y = sl.logsumexp(x, axis=-1)
    assert y.dtype == dtype
    want = jax.nn.logsumexp(x.astype(jnp.float32), axis=-1).astype(dtype)
    np.testing.assert_array_equal(y, want)


def test_one_x_sized_residual():
    x = jax.random.normal(jax.random.key(4), (64, 256))
    _, vjp = jax.vjp(lambda x: sl.logsumexp(x, axis=-1), x)
    leaves = [a for a in jax.tree.leaves(vjp) if hasattr(a, "size") and a.size >= x.size]
    assert len(leaves) == 1


def test_no_inf_inside_for_finite_input():
    x = jax.random.normal(jax.random.key(5), (3, 7))
    with jax.debug_infs(True):
        jax.grad(lambda x: sl.logsumexp(x, axis=-1, where=x > 0).sum())(x).block_until_ready()


def test_x64_integers():
    with jax.enable_x64(True):
        assert sl.logsumexp(jnp.arange(4)).dtype == jnp.float64


def test_bad_arguments_raise():
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError, match="boolean"):
        sl.logsumexp(x, where=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="out of range"):
        sl.logsumexp(x, axis=2)
    with pytest.raises(ValueError, match="`b`"):
        sl.logsumexp(x, b=jnp.ones(4))
