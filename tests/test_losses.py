"""sigmoid, log_sigmoid, sigmoid_binary_cross_entropy, softmax_cross_entropy and
mean_over_valid: values, exact gradients at 0 and +-inf, ignored entries contribute nothing."""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import stablelayers as sl

FEW = settings(deadline=None, max_examples=20)
LOGITS = hnp.arrays(np.float32, (4, 6), elements=st.floats(-30, 30, width=32))
LABELS = hnp.arrays(np.int32, (4,), elements=st.integers(0, 5))
INF = np.float32(np.inf)


def _grad(f, x):
    return jax.jit(jax.grad(lambda x: jnp.sum(f(x))))(x)


# --- sigmoid family ------------------------------------------------------------------


def test_sigmoid_values_against_mpmath():
    x = np.array([-80, -20, -1, -1e-3, 0, 1e-3, 1, 20, 80], np.float32)
    with mpmath.workdps(40):
        ref = [float(1 / (1 + mpmath.exp(-mpmath.mpf(float(v))))) for v in x]
        ref_log = [float(-mpmath.log1p(mpmath.exp(-mpmath.mpf(float(v))))) for v in x]
    np.testing.assert_allclose(sl.sigmoid(x), ref, rtol=3e-7)
    np.testing.assert_allclose(sl.log_sigmoid(x), ref_log, rtol=3e-7)


def test_sigmoid_gradients_exact_at_zero_and_infinity():
    x = jnp.array([-INF, 0.0, INF])
    np.testing.assert_array_equal(sl.sigmoid(x), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(_grad(sl.sigmoid, x), [0.0, 0.25, 0.0])
    np.testing.assert_array_equal(_grad(sl.log_sigmoid, x), [1.0, 0.5, 0.0])
    second = jax.jit(jax.vmap(jax.grad(jax.grad(sl.sigmoid))))(x)
    np.testing.assert_array_equal(second, [0.0, 0.0, 0.0])
    with sl.forward_mode():
        slope = jax.jit(jax.vmap(jax.jacfwd(sl.sigmoid)))(x)
        np.testing.assert_array_equal(slope, [0, 0.25, 0])


def test_binary_cross_entropy_at_infinity_is_exact():
    x = jnp.array([-INF, -INF, INF, INF, 0.0])
    t = jnp.array([0.0, 1.0, 0.0, 1.0, 1.0])
    loss = sl.sigmoid_binary_cross_entropy(x, t)
    np.testing.assert_array_equal(loss, [0.0, INF, INF, 0.0, np.log(2, dtype=np.float32)])
    grad = _grad(lambda x: sl.sigmoid_binary_cross_entropy(x, t), x)
    np.testing.assert_array_equal(grad, [0.0, -1.0, 1.0, 0.0, -0.5])


@FEW
@given(hnp.arrays(np.float32, (8,), elements=st.floats(-40, 40, width=32)))
def test_binary_cross_entropy_matches_optax(x):
    t = (np.arange(8) % 3) / 2
    np.testing.assert_allclose(
        sl.sigmoid_binary_cross_entropy(x, t),
        optax.sigmoid_binary_cross_entropy(x, t),
        rtol=1e-5,
        atol=1e-6,
    )


def test_binary_cross_entropy_masked_entries_give_nothing():
    x = jnp.array([1.0, jnp.nan, INF])
    where = jnp.array([True, False, False])
    f = lambda x: sl.sigmoid_binary_cross_entropy(x, 1.0, where=where)  # noqa: E731
    np.testing.assert_array_equal(f(x)[1:], 0.0)
    np.testing.assert_array_equal(_grad(f, x)[1:], 0.0)


def test_sigmoid_family_finite_differences():
    with jax.enable_x64(True):
        x = np.random.default_rng(0).normal(size=7) * 3
        for f in (sl.sigmoid, sl.log_sigmoid):
            check_grads(jax.jit(f), (x,), 2, ["rev"])
        bce = jax.jit(lambda x: sl.sigmoid_binary_cross_entropy(x, np.linspace(0, 1, 7)))
        check_grads(bce, (x,), 2, ["rev"])


# --- softmax_cross_entropy -------------------------------------------------------------


@FEW
@given(LOGITS, LABELS)
def test_matches_optax_and_integer_equals_one_hot(x, y):
    loss = sl.softmax_cross_entropy(x, y)
    np.testing.assert_allclose(
        loss, optax.softmax_cross_entropy_with_integer_labels(x, y), rtol=1e-5, atol=1e-5
    )
    one_hot = jax.nn.one_hot(y, 6)
    np.testing.assert_array_equal(sl.softmax_cross_entropy(x, one_hot), loss)
    g_int = _grad(lambda x: sl.softmax_cross_entropy(x, y), x)
    g_hot = _grad(lambda x: sl.softmax_cross_entropy(x, one_hot), x)
    np.testing.assert_array_equal(g_int, g_hot)


@FEW
@given(LOGITS, LABELS, hnp.arrays(bool, (4, 6)))
def test_minus_inf_off_the_label_gives_finite_loss_and_zero_gradient(x, y, off):
    off = off & (np.arange(6) != y[:, None])
    x = np.where(off, -INF, x).astype(np.float32)
    loss = sl.softmax_cross_entropy(x, y)
    assert np.all(np.isfinite(loss))
    grad = _grad(lambda x: sl.softmax_cross_entropy(x, y), x)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.where(off, grad, 0.0), 0.0)


@FEW
@given(LOGITS, LABELS, hnp.arrays(bool, (4,)), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_poison_in_an_ignored_row_changes_nothing(x, y, ignored, poison):
    y = np.where(ignored, -100, y)
    poisoned = np.where(ignored[:, None], np.float32(poison), x).astype(np.float32)

    def f(x):
        return sl.softmax_cross_entropy(x, y, ignore_index=-100, label_smoothing=0.1)

    np.testing.assert_array_equal(f(poisoned), f(x))
    np.testing.assert_array_equal(np.where(ignored, f(x), 0.0), 0.0)
    grad = _grad(f, poisoned)
    np.testing.assert_array_equal(grad, _grad(f, x))
    np.testing.assert_array_equal(np.where(ignored[:, None], grad, 0.0), 0.0)


def test_everything_ignored_gives_zero_mean_and_zero_gradient():
    x = jnp.full((3, 5), jnp.nan)
    y = jnp.full((3,), -1)

    def mean(x):
        return sl.mean_over_valid(sl.softmax_cross_entropy(x, y, ignore_index=-1), y != -1)

    assert float(mean(x)) == 0.0
    np.testing.assert_array_equal(jax.grad(mean)(x), 0.0)
    valid = jnp.array([True, False, True])
    np.testing.assert_allclose(sl.mean_over_valid(jnp.array([1.0, 9.0, 3.0]), valid), 2.0)


def test_masked_label_smoothing_does_not_leak():
    x = jax.random.normal(jax.random.key(0), (2, 5))
    y = jnp.array([0, 2])
    where = jnp.array([True, True, True, False, False])
    eps = 0.2
    loss = sl.softmax_cross_entropy(x, y, where=where, label_smoothing=eps)
    q = (1 - eps) * jax.nn.one_hot(y, 3) + eps / 3
    want = -jnp.sum(q * jax.nn.log_softmax(x[:, :3]), axis=-1)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    grad = _grad(lambda x: sl.softmax_cross_entropy(x, y, where=where, label_smoothing=eps), x)
    np.testing.assert_array_equal(grad[:, 3:], 0.0)
    np.testing.assert_allclose(grad[:, :3].sum(-1), 0.0, atol=1e-6)


def test_fully_masked_row_gives_zero_loss_and_gradient():
    x = jnp.array([[1.0, INF], [1.0, 2.0]])
    where = jnp.array([[False, False], [True, True]])
    f = lambda x: sl.softmax_cross_entropy(x, jnp.array([0, 1]), where=where)  # noqa: E731
    assert f(x)[0] == 0.0
    np.testing.assert_array_equal(_grad(f, x)[0], 0.0)


def test_z_loss_and_probability_labels():
    x = jax.random.normal(jax.random.key(1), (3, 7)) * 4
    p = jax.nn.softmax(jax.random.normal(jax.random.key(2), (3, 7)))
    lse = jax.nn.logsumexp(x, axis=-1)
    want = optax.softmax_cross_entropy(x, p) + 1e-2 * lse**2
    np.testing.assert_allclose(sl.softmax_cross_entropy(x, p, z_loss=1e-2), want, rtol=1e-5)


def test_class_axis_and_x64_integer_labels():
    x = jax.random.normal(jax.random.key(3), (5, 3))
    y = jnp.array([1, 0, 4])
    np.testing.assert_allclose(
        sl.softmax_cross_entropy(x, y, axis=0), sl.softmax_cross_entropy(x.T, y), rtol=1e-6
    )
    with jax.enable_x64(True):
        y64 = jnp.array([1, 0, 4])
        assert y64.dtype == jnp.int64
        loss = sl.softmax_cross_entropy(np.asarray(x.T, np.float64), y64)
        assert loss.dtype == jnp.float64


def test_cross_entropy_finite_differences_and_transforms():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x, y = rng.normal(size=(3, 5)), np.array([0, 4, -1])
        where = np.array([True, True, True, False, True])

        def f(x):
            return sl.softmax_cross_entropy(
                x, y, where=where, label_smoothing=0.1, z_loss=1e-2, ignore_index=-1
            )

        check_grads(jax.jit(f), (x,), 2, ["rev"])
        with sl.forward_mode():
            check_grads(jax.jit(f), (x,), 2, ["fwd", "rev"])
        hess = jax.jit(jax.hessian(lambda r: jnp.sum(f(r))))(x)
        assert hess.shape == (3, 5, 3, 5) and np.all(np.isfinite(hess))
        per_row = jax.vmap(lambda r, t: sl.softmax_cross_entropy(r, t, where=where))
        whole = sl.softmax_cross_entropy(x[:2], y[:2], where=where)
        np.testing.assert_allclose(per_row(x[:2], y[:2]), whole, rtol=1e-12)


def test_cross_entropy_under_debug_infs():
    x = jax.random.normal(jax.random.key(4), (3, 5))
    y = jnp.array([0, -1, 2])
    with jax.debug_infs(True):
        f = lambda x: sl.softmax_cross_entropy(x, y, ignore_index=-1, z_loss=1e-3)  # noqa: E731
        jax.grad(lambda x: jnp.sum(f(x)))(x).block_until_ready()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
    x = jax.random.normal(jax.random.key(5), (4, 9)).astype(dtype)
    y = jnp.array([0, 3, 8, 1])
    loss = sl.softmax_cross_entropy(x, y)
    assert loss.dtype == dtype
    want = optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), y)
    np.testing.assert_allclose(loss.astype(jnp.float32), want, rtol=1e-2)


def test_bad_arguments_raise():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="integer `labels` must have"):
        sl.softmax_cross_entropy(x, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="probability `labels`"):
        sl.softmax_cross_entropy(x, jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="integer or float"):
        sl.softmax_cross_entropy(x, jnp.array([True, False]))
    with pytest.raises(ValueError, match="out of range"):
        sl.softmax_cross_entropy(x, jnp.array([0, 1]), axis=3)
    with pytest.raises(TypeError, match="boolean"):
        sl.softmax_cross_entropy(x, jnp.array([0, 1]), where=jnp.ones(3))
    for eps in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            sl.softmax_cross_entropy(x, jnp.array([0, 1]), label_smoothing=eps)
    with pytest.raises(ValueError, match="z_loss"):
        sl.softmax_cross_entropy(x, jnp.array([0, 1]), z_loss=-1.0)
    with pytest.raises(ValueError, match="labels"):
        sl.sigmoid_binary_cross_entropy(x, jnp.ones(4))


# ---------------------------------------------------------------------------------------
# Gradients with respect to the labels (distillation, learned soft targets)


def test_softmax_cross_entropy_label_gradient_is_minus_log_softmax_at_zero_labels(x64):
    # d loss / d q_j = -log_softmax(x)_j for every class, q_j == 0 included (a where-guard
    # on q_j != 0 alone would send 0 there); the value is optax's -sum q log p.
    x = jax.random.normal(jax.random.key(0), (3, 5), jnp.float64)
    q = jax.nn.softmax(jax.random.normal(jax.random.key(1), (3, 5), jnp.float64))
    q = q.at[:, 2].set(0.0)
    q = q / q.sum(-1, keepdims=True)
    grad_q = jax.grad(lambda q: jnp.sum(sl.softmax_cross_entropy(x, q)))(q)
    np.testing.assert_allclose(grad_q, -jax.nn.log_softmax(x), rtol=1e-12)
    np.testing.assert_allclose(
        sl.softmax_cross_entropy(x, q), -jnp.sum(q * jax.nn.log_softmax(x), -1), rtol=1e-12
    )
    check_grads(sl.softmax_cross_entropy, (x, q), order=2, modes=["rev"])


def test_softmax_cross_entropy_minus_inf_logit_off_target_keeps_its_label_gradient():
    x = jnp.array([1.0, -jnp.inf, 0.5])
    q = jnp.array([0.4, 0.0, 0.6])
    assert np.isfinite(sl.softmax_cross_entropy(x, q))
    grad_q = jax.grad(lambda q: sl.softmax_cross_entropy(x, q))(q)
    # -log p_j: +inf where p_j = 0, as the math says; finite elsewhere.
    assert grad_q[1] == np.inf and np.all(np.isfinite(grad_q[np.array([0, 2])]))
    np.testing.assert_array_equal(jax.grad(sl.softmax_cross_entropy)(x, q)[1], 0.0)


def test_sigmoid_binary_cross_entropy_label_gradient_at_zero_and_one(x64):
    # d loss / d t = -x, at t == 0 and t == 1 too.
    x = jnp.array([-2.0, 0.5, 3.0, -1.0], jnp.float64)
    t = jnp.array([0.0, 1.0, 0.3, 1.0], jnp.float64)
    grad_t = jax.grad(lambda t: jnp.sum(sl.sigmoid_binary_cross_entropy(x, t)))(t)
    np.testing.assert_allclose(grad_t, -x, rtol=1e-12)
    check_grads(sl.sigmoid_binary_cross_entropy, (x, t), order=2, modes=["rev"])
