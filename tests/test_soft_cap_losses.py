"""logits_soft_cap in softmax_cross_entropy, linear_softmax_cross_entropy and the LMHead
layers: the loss of ``log_softmax(cap * tanh(z / cap))`` (Gemma 2, arXiv:2408.00118),
exact gradients, and ``None`` adding nothing."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import stablelayers as sl

TOKENS, HIDDEN, VOCAB, CAP = 9, 5, 13, 2.5


def _inputs():
    # Logits of a few caps in size, so the cap bends them (tanh far from linear).
    rng = np.random.default_rng(0)
    h = rng.normal(size=(TOKENS, HIDDEN)) * 2
    w = rng.normal(size=(HIDDEN, VOCAB)) * 2
    b = rng.normal(size=VOCAB)
    y = rng.integers(0, VOCAB, TOKENS)
    y[::4] = -1
    return h, w, b, y


def _reference(z, y, cap, eps=0.0, zl=0.0, mask=None, reduction="none"):
    """float64 NumPy: the loss of log_softmax(cap tanh(z / cap)), ignore_index -1, the
    class mask leaving classes out of the softmax and the smoothing."""
    z = np.asarray(z, np.float64)
    zc = cap * np.tanh(z / cap)
    live = np.ones(z.shape[-1], bool) if mask is None else np.asarray(mask)
    zc = np.where(live, zc, -np.inf)
    m = zc.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(zc - m).sum(-1))
    logp = np.where(live, zc - lse[:, None], 0.0)
    q = np.zeros_like(z)
    counted = y != -1
    q[np.arange(len(y))[counted], y[counted]] = 1.0
    q = np.where(live, (1 - eps) * q + eps / live.sum(), 0.0)
    loss = np.where(counted, -(q * logp).sum(-1) + zl * lse**2, 0.0)
    if reduction == "mean":
        return loss.sum() / max(counted.sum(), 1)
    return loss.sum() if reduction == "sum" else loss


CASES = [  # (chunk, eps, z_loss, masked, reduction)
    (1, 0.0, 0.0, False, "none"),
    (4, 0.1, 1e-2, True, "none"),
    (13, 0.1, 0.0, False, "mean"),
    (2, 0.0, 1e-2, True, "sum"),
    (None, 0.1, 1e-2, True, "mean"),
]


@pytest.mark.parametrize("chunk,eps,zl,masked,reduction", CASES)
def test_fused_and_materialised_equal_the_capped_reference(
    x64, chunk, eps, zl, masked, reduction
):
    h, w, b, y = _inputs()
    mask = np.arange(VOCAB) % 5 != 2 if masked else None
    opts = {"label_smoothing": eps, "z_loss": zl, "ignore_index": -1, "logits_soft_cap": CAP}

    def fused(h, w, b):
        return sl.linear_softmax_cross_entropy(
            h, w, y, bias=b, vocab_mask=mask, chunk_size=chunk, reduction=reduction, **opts
        )

    def plain(h, w, b):
        where = None if mask is None else jnp.asarray(mask)
        return sl.softmax_cross_entropy(
            h @ w + b[None], y, where=where, reduction=reduction, **opts
        )

    want = _reference(h @ w + b[None], y, CAP, eps, zl, mask, reduction)
    for f in (fused, plain):
        np.testing.assert_allclose(jax.jit(f)(h, w, b), want, rtol=1e-12, atol=1e-12)
    gf = jax.jit(jax.grad(lambda *a: jnp.sum(fused(*a)), (0, 1, 2)))(h, w, b)
    gp = jax.grad(lambda *a: jnp.sum(plain(*a)), (0, 1, 2))(h, w, b)
    for got, ref in zip(gf, gp, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


# 'mean' (37 s) is slow for CI's 20 minutes; 'none' runs the same capped blocks.
@pytest.mark.parametrize("reduction", ["none", pytest.param("mean", marks=pytest.mark.slow)])
def test_fused_gradients_to_second_order_both_modes(x64, reduction):
    h, w, b, y = _inputs()
    h, w, b = h[:5, :3], w[:3, :7], b[:7]
    y = np.array([0, 3, 6, -1, 5])

    def f(h, w, b, cap):
        return sl.linear_softmax_cross_entropy(
            h, w, y, bias=b, chunk_size=3, ignore_index=-1, label_smoothing=0.1, z_loss=0.01,
            reduction=reduction, logits_soft_cap=cap,
        )  # fmt: skip

    # The cap traced (its derivative too), and concrete (a constant).
    check_grads(jax.jit(f), (h, w, b, CAP), 2, ["rev"])
    check_grads(jax.jit(lambda h, w, b: f(h, w, b, CAP)), (h, w, b), 2, ["rev"])
    with sl.forward_mode():
        check_grads(jax.jit(f), (h, w, b, CAP), 2 if reduction == "mean" else 1, ["fwd"])
    if reduction == "mean":
        ref = lambda h, w, b: sl.softmax_cross_entropy(  # noqa: E731
            h @ w + b[None], y, ignore_index=-1, label_smoothing=0.1, z_loss=0.01,
            logits_soft_cap=CAP, reduction="mean",
        )  # fmt: skip
        for got, want in zip(
            jax.tree.leaves(jax.hessian(lambda *a: f(*a, CAP), (0, 1, 2))(h, w, b)),
            jax.tree.leaves(jax.hessian(ref, (0, 1, 2))(h, w, b)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_materialised_gradients_and_vmap(x64):
    h, w, _, y = _inputs()
    z, y = (h @ w)[:4, :6], np.minimum(y[:4], 5)

    def f(z, cap):
        return sl.softmax_cross_entropy(
            z, y, ignore_index=-1, label_smoothing=0.1, logits_soft_cap=cap
        )

    check_grads(jax.jit(f), (z, CAP), 2, ["rev"])
    with sl.forward_mode():
        check_grads(jax.jit(f), (z, CAP), 2, ["fwd", "rev"])
    zs = np.stack([z, 2 * z])
    np.testing.assert_allclose(
        jax.vmap(f, (0, None))(zs, CAP), [f(z, CAP), f(2 * z, CAP)], rtol=1e-13
    )


def test_infinite_logits_and_half_precision():
    # -inf becomes -cap: finite loss, zero gradient there, also in the traced cap.
    z = jnp.array([[0.0, -jnp.inf, 3.0]])
    dz, dc = jax.jit(
        jax.grad(
            lambda z, c: sl.softmax_cross_entropy(z, jnp.array([2]), logits_soft_cap=c)[0],
            (0, 1),
        )
    )(z, jnp.float32(2.0))
    assert dz[0, 1] == 0.0 and np.isfinite(dc) and np.all(np.isfinite(dz))
    h, w, _, y = _inputs()
    h16, w16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    fused = sl.linear_softmax_cross_entropy(h16, w16, y, ignore_index=-1, logits_soft_cap=CAP)
    want = _reference(np.asarray(h16, np.float64) @ np.asarray(w16, np.float64), y, CAP)
    assert fused.dtype == jnp.float32
    np.testing.assert_allclose(fused, want, rtol=2e-3, atol=2e-3)


def _jaxprs(cap_kw):
    *arrays, y = _inputs()
    h, w, b = (jnp.asarray(a, jnp.float32) for a in arrays)
    out = []
    for reduction in ("none", "mean"):

        def f(h, w, b, reduction=reduction):
            return jnp.sum(
                sl.linear_softmax_cross_entropy(
                    h,
                    w,
                    y,
                    bias=b,
                    chunk_size=4,
                    ignore_index=-1,
                    reduction=reduction,
                    **cap_kw,
                )
            )

        out.append(str(jax.make_jaxpr(jax.value_and_grad(f, (0, 1, 2)))(h, w, b)))
        with sl.forward_mode():
            out.append(str(jax.make_jaxpr(lambda *a, f=f: jax.jvp(f, a, a))(h, w, b)))
    g = lambda z: jnp.sum(sl.softmax_cross_entropy(z, y, ignore_index=-1, **cap_kw))  # noqa: E731
    out.append(str(jax.make_jaxpr(jax.value_and_grad(g))(h @ w)))
    # checkify's debug checks number their messages in the order traced: not a change.
    return [re.sub(r"select_n False:bool\[\] \d+:", "select_n False:bool[] N:", s) for s in out]


def test_none_adds_nothing_and_a_cap_adds_tanh():
    plain, with_none, capped = (
        _jaxprs({}),
        _jaxprs({"logits_soft_cap": None}),
        _jaxprs({"logits_soft_cap": CAP}),
    )
    assert plain == with_none
    assert all("tanh" not in s for s in plain) and all("tanh" in s for s in capped)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_cap_raises(bad):
    h, w, _, y = _inputs()
    with pytest.raises(ValueError, match="logits_soft_cap"):
        sl.softmax_cross_entropy(h @ w, y, ignore_index=-1, logits_soft_cap=bad)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        sl.linear_softmax_cross_entropy(h, w, y, ignore_index=-1, logits_soft_cap=bad)
    with pytest.raises(TypeError, match="logits_soft_cap"):
        sl.linear_softmax_cross_entropy(h, w, y, logits_soft_cap=jnp.ones(2))


def test_traced_cap_under_jit_equals_concrete():
    *arrays, y = _inputs()
    h, w, b = (jnp.asarray(a, jnp.float32) for a in arrays)
    for reduction in ("none", "mean"):
        f = jax.jit(
            lambda c, reduction=reduction: sl.linear_softmax_cross_entropy(
                h, w, y, bias=b, ignore_index=-1, logits_soft_cap=c, reduction=reduction
            )
        )
        want = sl.linear_softmax_cross_entropy(
            h, w, y, bias=b, ignore_index=-1, logits_soft_cap=CAP, reduction=reduction
        )
        np.testing.assert_allclose(f(CAP), want, rtol=1e-6)
        caps = jnp.array([CAP, 30.0])
        np.testing.assert_allclose(jax.vmap(f)(caps), [f(CAP), f(30.0)], rtol=1e-6)
        dcap = jax.grad(lambda c, f=f: jnp.sum(f(c)))
        np.testing.assert_allclose(jax.vmap(dcap)(caps)[0], dcap(CAP), rtol=1e-5)


@pytest.mark.parametrize("framework", ["nnx", "linen", "equinox"])
def test_lm_heads_pass_the_cap_through(framework):
    h = jnp.asarray(_inputs()[0], jnp.float32)
    y = _inputs()[3]
    if framework == "nnx":
        from flax import nnx

        from stablelayers.nnx import LMHead

        head = LMHead(HIDDEN, VOCAB, ignore_index=-1, logits_soft_cap=CAP, rngs=nnx.Rngs(0))
        loss, logits = head(h, y), head.logits(h)
    elif framework == "linen":
        from stablelayers.linen import LMHead as LinenHead

        module = LinenHead(VOCAB, ignore_index=-1, logits_soft_cap=CAP)
        params = module.init(jax.random.key(0), h, y)
        loss = module.apply(params, h, y)
        logits = module.apply(params, h, method="logits")
    else:
        from stablelayers.equinox import LMHead as EqxHead

        head = EqxHead(
            HIDDEN, VOCAB, ignore_index=-1, logits_soft_cap=CAP, key=jax.random.key(0)
        )
        loss, logits = head(h, y), head.logits(h)
    want = _reference(np.asarray(logits, np.float64), y, CAP)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(loss, _reference(np.asarray(logits, np.float64), y, 1e6), rtol=1e-3)
