"""linear_softmax_cross_entropy: equal to the materialised loss to float32 rounding, and
never forms a (tokens, vocab) array, forward or backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import stablelayers as sl

TOKENS, HIDDEN, VOCAB = 12, 8, 37


def _inputs(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (TOKENS, HIDDEN), dtype)
    w = (jax.random.normal(k[1], (HIDDEN, VOCAB)) / 2).astype(dtype)
    b = jax.random.normal(k[2], (VOCAB,)).astype(dtype)
    y = jax.random.randint(k[3], (TOKENS,), 0, VOCAB)
    return h, w, b, y


def _options(y, smoothing, z_loss, masked, ignored):
    """The labels and the keyword options of one drawn case."""
    options = {"label_smoothing": smoothing, "z_loss": z_loss}
    if masked:
        options["vocab_mask"] = jnp.arange(VOCAB) % 4 != 1
    if ignored:
        y = y.at[::3].set(-100)
        options["ignore_index"] = -100
    return y, options


def _plain(options):
    """The options under softmax_cross_entropy's names: the class mask is its `where`."""
    plain = dict(options)
    if "vocab_mask" in plain:
        plain["where"] = plain.pop("vocab_mask")
    return plain


def _both(y, options, chunk):
    def fused(h, w, b):
        return sl.linear_softmax_cross_entropy(h, w, y, bias=b, chunk_size=chunk, **options)

    def materialised(h, w, b):
        return sl.softmax_cross_entropy(h @ w + b[None], y, **_plain(options))

    return fused, materialised


@settings(deadline=None, max_examples=6)
@given(
    chunk=st.sampled_from([1, 5, 8, 37, 64]),
    smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    masked=st.booleans(),
    ignored=st.booleans(),
)
def test_fused_equals_materialised(chunk, smoothing, z_loss, masked, ignored):
    h, w, b, y = _inputs()
    y, options = _options(y, smoothing, z_loss, masked, ignored)
    fused, materialised = _both(y, options, chunk)
    np.testing.assert_allclose(fused(h, w, b), materialised(h, w, b), rtol=2e-6, atol=2e-6)
    vg = [
        jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a)), (0, 1, 2)))
        for f in (fused, materialised)
    ]
    for got, want in zip(vg[0](h, w, b), vg[1](h, w, b), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_never_forms_tokens_by_vocab():
    h, w, _, y = _inputs()
    loss = lambda h, w: jnp.sum(sl.linear_softmax_cross_entropy(h, w, y, chunk_size=8))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(h, w)
    shapes = set()

    def walk(jx):
        for eqn in jx.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
                walk(sub)
            for p in eqn.params.values():
                if hasattr(p, "jaxpr"):
                    walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)

    walk(jaxpr.jaxpr)
    assert (TOKENS, VOCAB) not in shapes
    assert (TOKENS, 8) in shapes


def test_residuals_hold_no_logits():
    h, w, _, y = _inputs()
    _, vjp = jax.vjp(lambda h, w: sl.linear_softmax_cross_entropy(h, w, y, chunk_size=8), h, w)
    sizes = [a.size for a in jax.tree.leaves(vjp) if hasattr(a, "size")]
    assert max(sizes) <= max(h.size, w.size)


def test_finite_differences_and_forward_mode():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        h, w, b = rng.normal(size=(5, 4)), rng.normal(size=(4, 11)), rng.normal(size=11)
        y = np.array([0, 3, 10, -1, 5])

        def f(h, w, b):
            return sl.linear_softmax_cross_entropy(
                h, w, y, bias=b, chunk_size=4, ignore_index=-1, label_smoothing=0.1, z_loss=0.01
            )

        check_grads(jax.jit(f), (h, w, b), 2, ["rev"])
        with sl.forward_mode():
            check_grads(jax.jit(f), (h, w, b), 1, ["fwd"])


def test_poisoned_ignored_token_changes_nothing():
    h, w, _, y = _inputs()
    y = y.at[2].set(-1)
    poisoned = h.at[2].set(jnp.nan).at[2, 0].set(jnp.inf)

    def f(h):
        return jnp.sum(sl.linear_softmax_cross_entropy(h, w, y, ignore_index=-1, chunk_size=8))

    np.testing.assert_array_equal(f(poisoned), f(h))
    grads = jax.jit(jax.grad(f))(poisoned)
    np.testing.assert_array_equal(grads, jax.jit(jax.grad(f))(h))
    np.testing.assert_array_equal(grads[2], 0.0)


def test_all_ignored_gives_zero():
    h, w, _, _ = _inputs()
    y = jnp.full((TOKENS,), -1)

    def mean(h, w):
        loss = sl.linear_softmax_cross_entropy(h, w, y, ignore_index=-1, chunk_size=8)
        return sl.mean_over_valid(loss, y != -1)

    assert float(mean(h, w)) == 0.0
    for g in jax.grad(mean, (0, 1))(h, w):
        np.testing.assert_array_equal(g, 0.0)


def test_bfloat16_and_batch_axes():
    h, w, _, y = _inputs(dtype=jnp.bfloat16)
    loss = sl.linear_softmax_cross_entropy(h.reshape(3, 4, HIDDEN), w, y.reshape(3, 4))
    assert loss.shape == (3, 4) and loss.dtype == jnp.float32
    want = sl.softmax_cross_entropy(jnp.matmul(h, w, preferred_element_type=jnp.float32), y)
    np.testing.assert_allclose(loss.reshape(-1), want, rtol=1e-5)
    dh, dw = jax.grad(
        lambda h, w: jnp.sum(sl.linear_softmax_cross_entropy(h, w, y, chunk_size=16)), (0, 1)
    )(h, w)
    assert dh.dtype == dw.dtype == jnp.bfloat16


def test_bad_arguments_raise():
    h, w, b, y = _inputs()
    with pytest.raises(ValueError, match=r"\(hidden, vocab\)"):
        sl.linear_softmax_cross_entropy(h, w.T, y)
    with pytest.raises(TypeError, match="integer dtype"):
        sl.linear_softmax_cross_entropy(h, w, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="labels"):
        sl.linear_softmax_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        sl.linear_softmax_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="bias"):
        sl.linear_softmax_cross_entropy(h, w, y, bias=b[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        sl.linear_softmax_cross_entropy(h, w, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match="z_loss"):
        sl.linear_softmax_cross_entropy(h, w, y, z_loss=-1e-4)


def _reduce(loss, y, reduction, ignore_index):
    if reduction == "sum":
        return jnp.sum(loss)
    valid = jnp.ones_like(y, bool) if ignore_index is None else y != ignore_index
    return sl.mean_over_valid(loss, valid)


@settings(deadline=None, max_examples=8)
@given(
    reduction=st.sampled_from(["mean", "sum"]),
    chunk=st.sampled_from([1, 5, 12, None]),
    smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    masked=st.booleans(),
    ignored=st.booleans(),
)
def test_reduced_fused_equals_materialised(
    reduction, chunk, smoothing, z_loss, masked, ignored
):
    h, w, b, y = _inputs()
    y, options = _options(y, smoothing, z_loss, masked, ignored)

    def fused(h, w, b):
        return sl.linear_softmax_cross_entropy(
            h, w, y, bias=b, chunk_size=chunk, reduction=reduction, **options
        )

    def materialised(h, w, b):
        loss = sl.softmax_cross_entropy(h @ w + b[None], y, **_plain(options))
        return _reduce(loss, y, reduction, options.get("ignore_index"))

    np.testing.assert_allclose(fused(h, w, b), materialised(h, w, b), rtol=2e-6)
    none = sl.linear_softmax_cross_entropy(h, w, y, bias=b, **options)
    np.testing.assert_allclose(
        fused(h, w, b), _reduce(none, y, reduction, options.get("ignore_index")), rtol=2e-6
    )
    got = jax.jit(jax.grad(fused, (0, 1, 2)))(h, w, b)
    for g, want in zip(got, jax.grad(materialised, (0, 1, 2))(h, w, b), strict=True):
        np.testing.assert_allclose(g, want, rtol=2e-5, atol=2e-6)


# 'mean' (40 s) is slow for CI's 20 minutes; 'sum' runs the same reduced op.
@pytest.mark.parametrize("reduction", [pytest.param("mean", marks=pytest.mark.slow), "sum"])
def test_reduced_to_second_order_and_forward_mode(reduction):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        h, w, b = rng.normal(size=(5, 4)), rng.normal(size=(4, 11)), rng.normal(size=11)
        y = np.array([0, 3, 10, -1, 5])
        options = {"ignore_index": -1, "label_smoothing": 0.1, "z_loss": 0.01}

        def f(h, w, b):
            return sl.linear_softmax_cross_entropy(
                h, w, y, bias=b, chunk_size=2, reduction=reduction, **options
            )

        def materialised(h, w, b):
            loss = sl.softmax_cross_entropy(h @ w + b[None], y, **_plain(options))
            return _reduce(loss, y, reduction, -1)

        check_grads(jax.jit(f), (h, w, b), 2, ["rev"])
        with sl.forward_mode():
            check_grads(jax.jit(f), (h, w, b), 2, ["fwd", "rev"])
        for got, want in zip(
            jax.tree.leaves(jax.hessian(f, (0, 1, 2))(h, w, b)),
            jax.tree.leaves(jax.hessian(materialised, (0, 1, 2))(h, w, b)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        hs = np.stack([h, 2 * h])
        np.testing.assert_allclose(
            jax.vmap(f, (0, None, None))(hs, w, b), [f(h, w, b), f(2 * h, w, b)], rtol=1e-12
        )
        np.testing.assert_allclose(
            jax.vmap(jax.grad(f), (0, None, None))(hs, w, b)[1],
            jax.grad(f)(2 * h, w, b),
            rtol=1e-12,
        )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_all_ignored_is_exactly_zero(reduction):
    h, w, _, _ = _inputs()
    y = jnp.full((TOKENS,), -1)

    def f(h, w):
        poisoned = h.at[0].set(jnp.nan)
        return sl.linear_softmax_cross_entropy(
            poisoned, w, y, ignore_index=-1, chunk_size=5, reduction=reduction
        )

    assert float(f(h, w)) == 0.0
    for g in jax.jit(jax.grad(f, (0, 1)))(h, w):
        np.testing.assert_array_equal(g, 0.0)


def test_reduced_bfloat16_keeps_dtypes_to_second_order():
    h, w, _, y = _inputs(dtype=jnp.bfloat16)

    def f(h, w):
        return sl.linear_softmax_cross_entropy(h, w, y, reduction="mean", chunk_size=5)

    want = jnp.mean(
        sl.softmax_cross_entropy(jnp.matmul(h, w, preferred_element_type=jnp.float32), y)
    )
    np.testing.assert_allclose(f(h, w), want, rtol=1e-5)
    dh, dw = jax.grad(f, (0, 1))(h, w)
    assert dh.dtype == dw.dtype == jnp.bfloat16
    # Second order through the bit-sliced half-precision blocks.
    hvp = jax.jvp(jax.grad(lambda h: f(h, w)), (h,), (jnp.ones_like(h),))[1]
    assert hvp.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(hvp)))


def test_unknown_reduction_raises():
    h, w, _, y = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        sl.linear_softmax_cross_entropy(h, w, y, reduction="max")


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("eps", "z"), [(0.0, 0.0), (0.1, 0.01)])
def test_label_on_masked_class_matches_materialised(reduction, eps, z):
    # softmax_cross_entropy drops the target mass of a label whose class `where` masks:
    # loss (1 - eps) tl (lse - t) + eps (lse - S / K) + z lse^2 with tl = 0 there.
    rng = np.random.default_rng(1)
    h, w, b = rng.normal(size=(6, 4)), rng.normal(size=(4, 9)), rng.normal(size=9)
    mask = np.arange(9) % 3 != 2
    y = np.array([2, 0, 5, 8, -1, 4])  # three labels on masked classes, one ignored

    def fused(h, w, b, eps, z):
        return sl.linear_softmax_cross_entropy(
            h, w, y, bias=b, vocab_mask=mask, label_smoothing=eps, z_loss=z,
            ignore_index=-1, chunk_size=4, reduction=reduction,
        )  # fmt: skip

    def plain(h, w, b, eps, z):
        loss = sl.softmax_cross_entropy(
            h @ w + b[None], y, where=mask, label_smoothing=eps, z_loss=z, ignore_index=-1
        )
        return loss if reduction == "none" else _reduce(loss, y, reduction, -1)

    args = (h, w, b, np.float64(eps), np.float64(z))
    np.testing.assert_allclose(fused(*args), plain(*args), rtol=1e-12, atol=1e-12)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a)), range(5))(*args) for f in (fused, plain)]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    dots = tuple(rng.normal(size=np.shape(a)) for a in args)
    with sl.forward_mode():
        got, want = (jax.jvp(f, args, dots)[1] for f in (fused, plain))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    check_grads(lambda h, w, b: fused(h, w, b, eps, z), (h, w, b), 1, ["rev"])
