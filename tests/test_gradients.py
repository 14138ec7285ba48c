"""Gradients against float64 finite differences, second order included, and the
gradient rules for masks, sinks, beta and dominant rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import stablelayers as sl

# check_grads compares reverse mode, to second order, with float64 finite differences.
ORDER = 2


def _logits(shape, scale=3.0, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64) * scale


@pytest.mark.parametrize("axis", [-1, 0, (0, 1)])
def test_softmax_and_log_softmax_grads(x64, axis):
    x = _logits((3, 4, 5))
    w = _logits((3, 4, 5), 1.0, seed=1)
    for op in (sl.softmax, sl.log_softmax, sl.masked_softmax):
        check_grads(lambda x, op=op: jnp.sum(op(x, axis=axis) * w), (x,), ORDER, modes=("rev",))


def test_masked_grads(x64):
    x = _logits((4, 6))
    mask = jax.random.bernoulli(jax.random.key(2), 0.6, (4, 6)).at[:, 0].set(True)
    w = _logits((4, 6), 1.0, seed=3)
    for op in (sl.softmax, sl.masked_softmax):
        check_grads(
            lambda x, op=op: jnp.sum(op(x, where=mask) * w), (x,), ORDER, modes=("rev",)
        )
    # log_softmax is -inf where masked: weight only the unmasked places.
    check_grads(
        lambda x: jnp.sum(jnp.where(mask, sl.log_softmax(x, where=mask), 0) * w),
        (x,),
        ORDER,
        modes=("rev",),
    )


def test_sink_grads(x64):
    x = _logits((2, 3, 5))
    sink = _logits((3,), seed=4)  # one per "head": x is (batch, heads, keys)
    w = _logits((2, 3, 5), 1.0, seed=5)
    check_grads(
        lambda x, s: jnp.sum(sl.masked_softmax(x, sink=s) * w), (x, sink), ORDER, modes=("rev",)
    )
    mask = jnp.arange(5) < 3
    check_grads(
        lambda x, s: jnp.sum(sl.masked_softmax(x, where=mask, sink=s) * w),
        (x, sink),
        ORDER,
        modes=("rev",),
    )


def test_sink_gradient_formula(x64):
    x = _logits((4, 7))
    sink = _logits((4,), seed=6)
    w = _logits((4, 7), 1.0, seed=7)
    grad_sink = jax.grad(lambda s: jnp.sum(sl.masked_softmax(x, sink=s) * w))(sink)
    ext = jax.nn.softmax(jnp.concatenate([x, sink[:, None]], -1))
    y, p_sink = ext[:, :-1], ext[:, -1]
    np.testing.assert_allclose(grad_sink, -p_sink * jnp.sum(w * y, -1), rtol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.25, 3.0])
def test_softplus_grads(x64, beta):
    x = jnp.concatenate([_logits((20,), 10.0), jnp.array([-50.0, -5.0, 0.0, 5.0, 50.0])])
    check_grads(lambda x: jnp.sum(sl.softplus(x, beta)), (x,), ORDER, modes=("rev",))


def test_softplus_beta_grads(x64):
    x = jnp.concatenate([_logits((20,), 4.0), jnp.array([-30.0, -3.0, 0.0, 3.0, 30.0])])
    for beta in (jnp.float64(1.0), jnp.float64(0.3), jnp.full((25,), 2.0)):
        check_grads(
            lambda x, b: jnp.sum(sl.softplus(x, b) * jnp.cos(x)),
            (x, beta),
            ORDER,
            modes=("rev",),
        )


def test_softplus_beta_grad_broadcasts_to_beta_shape(x64):
    x = _logits((3, 4))
    beta = jnp.array([[0.5], [1.0], [2.0]])
    g = jax.grad(lambda b: jnp.sum(sl.softplus(x, b)))(beta)
    want = jax.grad(lambda b: jnp.sum(jnp.logaddexp(b * x, 0.0) / b))(beta)
    assert g.shape == beta.shape
    np.testing.assert_allclose(g, want, rtol=1e-10)


def test_softplus_derivative_is_sigmoid():
    x = jnp.array([-jnp.inf, -100.0, -10.0, 0.0, 10.0, 100.0, jnp.inf])
    g = jax.grad(lambda x: jnp.sum(sl.softplus(x)))(x)
    np.testing.assert_allclose(g, jax.nn.sigmoid(x), rtol=1e-6)
    assert g[0] == 0.0 and g[-1] == 1.0
    g2 = jax.grad(lambda x: jnp.sum(sl.softplus(x, 2.0)))(x)
    np.testing.assert_allclose(g2, jax.nn.sigmoid(2.0 * x), rtol=1e-6)


@pytest.mark.parametrize("op", [sl.softmax, sl.masked_softmax, sl.log_softmax])
def test_fully_masked_row_and_non_finite_masked_places_give_zero_gradient(op):
    x = jnp.array([[1.0, jnp.nan, 3.0, jnp.inf], [jnp.nan, jnp.inf, -jnp.inf, 2.0]])
    mask = jnp.array([[True, False, True, False], [False, False, False, False]])
    w = jnp.arange(8.0).reshape(2, 4)

    def loss(x):
        y = op(x, where=mask)
        return jnp.sum(jnp.where(mask, y, 0.0) * w)

    g = jax.grad(loss)(x)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)
    h = jax.hessian(lambda x: loss(x))(x)
    assert np.all(np.isfinite(h))


def test_all_minus_inf_row_has_zero_gradient():
    x = jnp.array([[-jnp.inf] * 3, [0.0, 1.0, -jnp.inf]])
    w = jnp.ones((2, 3)) * jnp.array([[1.0, 2.0, 3.0]])
    g = jax.grad(lambda x: jnp.sum(sl.masked_softmax(x) * w))(x)
    np.testing.assert_array_equal(g[0], 0.0)
    assert np.all(np.isfinite(g))
    gs = jax.grad(lambda s: jnp.sum(sl.masked_softmax(x, sink=s) * w))(jnp.zeros(2))
    assert np.all(np.isfinite(gs)) and gs[0] == 0.0


def _rel_err_at_argmax(g, reference, x):
    top = np.argmax(x, axis=-1)[:, None]
    got = np.take_along_axis(np.asarray(g, np.float64), top, -1)
    want = np.take_along_axis(reference, top, -1)
    # An exact zero (the cotangent's weights cancel) must come back as zero.
    assert np.all(got[want == 0] == 0)
    return np.max(np.abs(got - want)[want != 0] / np.abs(want[want != 0]))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_dominant_rows_gradient_at_argmax(hard_inputs, op):
    x, w = hard_inputs["dominant/x"], hard_inputs["dominant/w"]
    g = jax.grad(lambda x: jnp.sum(getattr(sl, op)(x) * w))(x)
    assert _rel_err_at_argmax(g, hard_inputs[f"dominant/{op}_vjp"], x) <= 1e-4


@pytest.mark.parametrize("name", ["normal_x1", "normal_x30", "normal_x1000", "f32max_mix"])
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_hard_input_gradients_no_worse_than_jax_nn(hard_inputs, op, name):
    x, w = hard_inputs[f"{name}/x"], hard_inputs[f"{name}/w"]
    ref = hard_inputs[f"{name}/{op}_vjp"]
    scale = np.maximum(np.max(np.abs(ref), axis=-1, keepdims=True), np.finfo(np.float32).tiny)

    def err(f):
        g = np.asarray(jax.grad(lambda x: jnp.sum(f(x) * w))(x), np.float64)
        return np.max(np.abs(g - ref) / scale)

    ours, theirs = err(getattr(sl, op)), err(getattr(jax.nn, op))
    assert ours <= max(2 * theirs, 1e-6), (ours, theirs)
