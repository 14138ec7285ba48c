"""logits_soft_cap in dot_product_attention: ``c * tanh(scale q.k / c)``, then the bias,
masks and sinks (Gemma 2), on the dense and chunked paths, with exact gradients; ``None``
changes nothing. The ring's soft cap is tested in test_ring_attention.py, the losses' in
test_soft_cap_losses.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import stablelayers as sl

B, L, H, D = 2, 24, 2, 4
CAP = 1.5


def _inputs(dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    # Logits of size ~10, well past the cap: the cap changes the answer.
    q = 4 * jax.random.normal(ks[0], (B, L, H, D), dtype)
    k = 4 * jax.random.normal(ks[1], (B, L, H, D), dtype)
    v = jax.random.normal(ks[2], (B, L, H, D), dtype)
    bias = jax.random.normal(ks[3], (1, H, L, L), dtype)
    sink = jax.random.normal(ks[4], (H,), dtype)
    return q, k, v, bias, sink


def _reference(q, k, v, bias, sink, cap):
    """float64 numpy: ``cap tanh(s / cap) + bias``, causal, the sink in each row's sum."""
    q, k, v, bias, sink = (np.asarray(a, np.float64) for a in (q, k, v, bias, sink))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    s = cap * np.tanh(s / cap) + bias
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    top = np.maximum(s.max(-1, keepdims=True), sink[None, :, None, None])
    e = np.exp(s - top)
    p = e / (e.sum(-1, keepdims=True) + np.exp(sink[None, :, None, None] - top))
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_values_equal_capped_then_masked_softmax(implementation):
    q, k, v, bias, sink = _inputs()
    out = sl.dot_product_attention(
        q,
        k,
        v,
        bias,
        sink=sink,
        is_causal=True,
        logits_soft_cap=CAP,
        implementation=implementation,
        chunk_size=8,
    )
    np.testing.assert_allclose(out, _reference(q, k, v, bias, sink, CAP), atol=2e-6)
    uncapped = sl.dot_product_attention(q, k, v, bias, sink=sink, is_causal=True)
    assert np.max(np.abs(np.asarray(uncapped) - np.asarray(out))) > 1e-2


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_gradients_match_finite_differences(x64, implementation):
    q, k, v, bias, sink = _inputs(jnp.float64)
    f = functools.partial(
        sl.dot_product_attention,
        is_causal=True,
        logits_soft_cap=CAP,
        implementation=implementation,
        chunk_size=8,
    )
    check_grads(
        lambda q, k, v, b, s: f(q, k, v, b, sink=s),
        (q / 4, k / 4, v, bias, sink),  # smaller logits: finite differences stay accurate
        order=1,
        modes=["rev"],
        atol=1e-6,
        rtol=1e-6,
    )


def test_dense_forward_mode_and_hessian(x64):
    q, k, v, bias, _ = _inputs(jnp.float64)
    q, k, v = (a[:1, :4, :1] for a in (q, k, v))
    bias = bias[:, :1, :4, :4]
    f = functools.partial(sl.dot_product_attention, logits_soft_cap=CAP, implementation="dense")
    with sl.forward_mode():
        check_grads(f, (q / 4, k / 4, v, bias), order=1, modes=["fwd"])
    # The Hessian in q of a scalar, against float64 finite differences of the gradient.
    loss = lambda q: jnp.sum(jnp.sin(f(q, k, v, bias)))  # noqa: E731
    hess = jax.hessian(loss)(q / 4).reshape(q.size, q.size)
    eps, flat = 1e-6, (q / 4).ravel()
    grad = jax.jit(jax.grad(loss))
    columns = [
        (grad((flat + eps * e).reshape(q.shape)) - grad((flat - eps * e).reshape(q.shape)))
        / (2 * eps)
        for e in np.eye(q.size)
    ]
    np.testing.assert_allclose(hess, np.stack([c.ravel() for c in columns], 1), atol=1e-6)


def test_huge_logits_stay_finite_under_the_cap():
    q, k, v, _, _ = _inputs()
    f = functools.partial(
        sl.dot_product_attention, logits_soft_cap=30.0, implementation="chunked", chunk_size=8
    )
    out, grads = jax.value_and_grad(
        lambda q, k: jnp.sum(f(q * 1e18, k * 1e18, v)), argnums=(0, 1)
    )(q, k)
    assert np.isfinite(float(out))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_no_cap_adds_nothing(implementation):
    q, k, v, _, _ = _inputs()
    f = functools.partial(sl.dot_product_attention, implementation=implementation)
    plain = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(f(q, k, v))))(q)
    none = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(f(q, k, v, logits_soft_cap=None))))(q)
    assert str(plain) == str(none)
    assert "tanh" not in str(plain)


@pytest.mark.parametrize(
    ("cap", "error"), [(0.0, ValueError), (-2.0, ValueError), (np.inf, ValueError)]
)
def test_bad_cap_raises(cap, error):
    q, k, v, _, _ = _inputs()
    with pytest.raises(error, match="logits_soft_cap"):
        sl.dot_product_attention(q, k, v, logits_soft_cap=cap)


def test_traced_cap_says_to_make_it_static():
    q, k, v, _, _ = _inputs()
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda c: sl.dot_product_attention(q, k, v, logits_soft_cap=c))(2.0)
