"""Every public op under jit, vmap, grad, grad-of-grad, hessian, HVPs, checkpoint and scan,
and forward mode through the documented switch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablelayers as sl

X = jax.random.normal(jax.random.key(0), (4, 6)) * 3
W = jax.random.normal(jax.random.key(1), (4, 6))
MASK = jnp.arange(6) < 4
SINK = jnp.linspace(-1.0, 1.0, 4)

OPS = {
    "softmax": lambda x: sl.softmax(x),
    "softmax_masked": lambda x: sl.softmax(x, where=MASK),
    "log_softmax": lambda x: sl.log_softmax(x),
    "masked_softmax_sink": lambda x: sl.masked_softmax(x, where=MASK, sink=SINK),
    "softplus": lambda x: sl.softplus(x),
    "softplus_beta": lambda x: sl.softplus(x, jnp.float32(1.7)),
}
# The same functions written with plain jax.nn autodiff, for reference derivatives.
REFERENCES = {
    "softmax": lambda x: jax.nn.softmax(x),
    "softmax_masked": lambda x: jnp.where(MASK, jax.nn.softmax(jnp.where(MASK, x, -1e30)), 0),
    "log_softmax": lambda x: jax.nn.log_softmax(x),
    "masked_softmax_sink": lambda x: jax.nn.softmax(
        jnp.concatenate([jnp.where(MASK, x, -1e30), SINK[:, None]], -1)
    )[:, :-1],
    "softplus": lambda x: jax.nn.softplus(x),
    "softplus_beta": lambda x: jax.nn.softplus(1.7 * x) / 1.7,
}
TOL = {"rtol": 2e-5, "atol": 2e-6}


def _loss(f):
    return lambda x: jnp.sum(jnp.sin(f(x)) * W)


@pytest.fixture(params=sorted(OPS))
def op(request):
    return request.param


def test_jit(op):
    np.testing.assert_allclose(jax.jit(OPS[op])(X), REFERENCES[op](X), **TOL)


def test_vmap(op):
    batched = jax.vmap(OPS[op])(jnp.stack([X, 2 * X]))
    np.testing.assert_allclose(batched[1], OPS[op](2 * X), **TOL)
    middle = jax.vmap(OPS[op], in_axes=1, out_axes=1)(jnp.stack([X, 2 * X], axis=1))
    np.testing.assert_allclose(middle[:, 0], OPS[op](X), **TOL)
    np.testing.assert_allclose(middle[:, 1], OPS[op](2 * X), **TOL)


def test_grad_and_grad_of_grad(op):
    g = jax.jit(jax.grad(_loss(OPS[op])))(X)
    np.testing.assert_allclose(g, jax.grad(_loss(REFERENCES[op]))(X), **TOL)
    # grad of a scalar function of the gradient (reverse over reverse).
    gg = jax.grad(lambda x: jnp.sum(jax.grad(_loss(OPS[op]))(x) ** 2))(X)
    want = jax.grad(lambda x: jnp.sum(jax.grad(_loss(REFERENCES[op]))(x) ** 2))(X)
    np.testing.assert_allclose(gg, want, rtol=1e-4, atol=1e-5)


def test_hessian_and_hvp(op):
    x = X[:2, :5]
    f = lambda v: _loss(OPS[op])(jnp.pad(v, ((0, 2), (0, 1))) + X * 0)  # noqa: E731
    ref = lambda v: _loss(REFERENCES[op])(jnp.pad(v, ((0, 2), (0, 1))) + X * 0)  # noqa: E731
    np.testing.assert_allclose(jax.hessian(f)(x), jax.hessian(ref)(x), rtol=1e-4, atol=1e-5)
    v = jnp.ones_like(X)
    hvp = jax.jvp(jax.grad(_loss(OPS[op])), (X,), (v,))[1]
    want = jax.jvp(jax.grad(_loss(REFERENCES[op])), (X,), (v,))[1]
    np.testing.assert_allclose(hvp, want, rtol=1e-4, atol=1e-5)


def test_checkpoint_and_scan(op):
    f = OPS[op]

    def body(carry, _):
        return jax.checkpoint(lambda c: f(c) + 0.5 * c)(carry), None

    def run(x):
        return jnp.sum(jax.lax.scan(body, x, None, length=3)[0] * W)

    def run_ref(x):
        def ref_body(c, _):
            return REFERENCES[op](c) + 0.5 * c, None

        return jnp.sum(jax.lax.scan(ref_body, x, None, length=3)[0] * W)

    np.testing.assert_allclose(jax.jit(jax.grad(run))(X), jax.grad(run_ref)(X), **TOL)


def test_forward_mode_switch(op):
    with sl.forward_mode():
        y, t = jax.jvp(OPS[op], (X,), (W,))
        jac_fwd = jax.jacfwd(OPS[op])(X[:2] if op != "masked_softmax_sink" else X)
        g = jax.grad(_loss(OPS[op]))(X)
    y_ref, t_ref = jax.jvp(REFERENCES[op], (X,), (W,))
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(t, t_ref, **TOL)
    np.testing.assert_allclose(g, jax.grad(_loss(REFERENCES[op]))(X), **TOL)
    jac_rev = jax.jacrev(OPS[op])(X[:2] if op != "masked_softmax_sink" else X)
    np.testing.assert_allclose(jac_fwd, jac_rev, **TOL)


def test_forward_mode_switch_differentiates_sink_and_beta():
    with sl.forward_mode():
        ds = jax.jacfwd(lambda s: sl.masked_softmax(X, sink=s))(SINK)
        db = jax.jacfwd(lambda b: sl.softplus(X, b))(jnp.float32(0.7))
    np.testing.assert_allclose(
        ds, jax.jacrev(lambda s: sl.masked_softmax(X, sink=s))(SINK), **TOL
    )
    np.testing.assert_allclose(
        db, jax.jacrev(lambda b: sl.softplus(X, b))(jnp.float32(0.7)), **TOL
    )


def test_forward_mode_without_switch_raises():
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(sl.softmax, (X,), (W,))


def test_forward_mode_switch_is_scoped():
    with sl.forward_mode():
        pass
    with pytest.raises(TypeError):
        jax.jvp(functools.partial(sl.log_softmax, axis=0), (X,), (W,))


def test_forward_mode_switch_retraces_a_function_jitted_outside_it():
    jitted = jax.jit(sl.softmax)
    y = jitted(X)
    with sl.forward_mode():
        _, t = jax.jvp(jitted, (X,), (W,))
    _, t_ref = jax.jvp(REFERENCES["softmax"], (X,), (W,))
    np.testing.assert_allclose(t, t_ref, **TOL)
    # And outside again, the reverse-mode rules (a jvp raises).
    np.testing.assert_allclose(jitted(X), y)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(jitted, (X,), (W,))
