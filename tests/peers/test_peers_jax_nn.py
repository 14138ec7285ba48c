"""JAX's own tests of jax.nn (tests/nn_test.py), re-written against stablelayers.

Each test names the case it ports. stablelayers' op replaces ``jax.nn``'s; where JAX's
test compares two implementations, the reference here is ``jax.nn`` itself, called with
the same keywords (jax.nn's names). ``documented difference`` tests assert stablelayers' own
documented behaviour (docs/semantics.md).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # what JAX's test uses
from jax.test_util import check_grads

import stablelayers as sl


def _close(a, b, atol, rtol=None):
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=rtol or atol
    )


X = jnp.array([5.5, 1.3, -4.2, 0.9])
WHERE = jnp.array([True, False, True, True])

# ---------------------------------------------------------------------------------------
# softmax / log_softmax


def _reference(fn, x):
    # jax.nn.log_softmax warns on integer input (a cast of -inf inside jax): the reference
    # value is what matters here, so only the reference call may warn.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(x)


@pytest.mark.parametrize("fn", [sl.softmax, sl.log_softmax], ids=["softmax", "log_softmax"])
def test_empty_array(fn):
    # origin: jax tests/nn_test.py testSoftmaxEmptyArray
    empty = jnp.array([], dtype=jnp.float32)
    out = fn(empty)
    assert out.shape == (0,) and out.dtype == empty.dtype


@pytest.mark.parametrize("fn", [sl.softmax, sl.log_softmax], ids=["softmax", "log_softmax"])
def test_empty_where_mask(fn):
    # origin: jax tests/nn_test.py testSoftmaxEmptyMask
    fill = 0.0 if fn is sl.softmax else -jnp.inf
    np.testing.assert_array_equal(fn(X, where=jnp.zeros(4, bool)), jnp.full(4, fill))


@pytest.mark.parametrize("fn", [sl.softmax, sl.log_softmax], ids=["softmax", "log_softmax"])
def test_where_mask(fn):
    # origin: jax tests/nn_test.py testSoftmaxWhereMask
    out = fn(X, where=WHERE)
    _close(out[WHERE], fn(X[WHERE]), atol=1e-6)
    probs = out if fn is sl.softmax else jnp.exp(out)
    _close(probs.sum(), 1.0, atol=1e-6)
    # JAX runs check_grads only for softmax (its log_softmax has no custom rule); both of
    # stablelayers' have one, so both are checked, forward mode via forward_mode().
    # (JAX's test also passes initial=-inf, which jax 0.10.2 no longer accepts.)
    # In float64, so finite differences of log_softmax's second order are exact enough.
    kept = jnp.array([0, 2, 3])
    with jax.enable_x64(True), sl.forward_mode():
        x64 = jnp.asarray(np.asarray(X), jnp.float64)
        check_grads(jax.jit(lambda x: jnp.take(fn(x, where=WHERE), kept)), (x64,), order=2)


@pytest.mark.parametrize("fn", [sl.softmax, sl.log_softmax], ids=["softmax", "log_softmax"])
def test_where_grad_ignores_masked_entry(fn):
    # origin: jax tests/nn_test.py testSoftmaxWhereGrad (jax issue 19490)
    x = jnp.array([36.0, 10000.0])
    grad = jax.grad(lambda x: fn(x, where=x < 1000)[0])(x)
    np.testing.assert_array_equal(grad, jnp.zeros_like(x))


def test_softmax_grad():
    # origin: jax tests/nn_test.py testSoftmaxGrad
    with sl.forward_mode():
        check_grads(jax.jit(sl.softmax), (X,), order=2, atol=5e-3)
    check_grads(jax.jit(sl.log_softmax), (X,), order=2, modes=["rev"], atol=5e-3)


def test_softmax_one_residual():
    # origin: jax tests/nn_test.py testSoftmaxGradResiduals / testSoftmaxGradFlag: one
    # array the size of x is kept for the backward pass (plus a flag of one element)
    res = saved_residuals(sl.softmax, X)
    assert [tuple(aval.shape) for aval, _ in res if aval.size > 1] == [(4,)]


@pytest.mark.parametrize("axis", [1, (0, 2), None], ids=lambda a: f"axis={a}")
def test_axis_forms(axis):
    # origin: jax tests/nn_test.py (axis forms of softmax/log_softmax, as the jax.nn API)
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    _close(sl.softmax(x, axis=axis), jax.nn.softmax(x, axis=axis), atol=1e-6)
    _close(sl.log_softmax(x, axis=axis), jax.nn.log_softmax(x, axis=axis), atol=1e-5)


@pytest.mark.parametrize(
    "dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.int32], ids=lambda d: d.__name__
)
def test_dtypes_match_jax_nn(dtype):
    # origin: jax tests/nn_test.py testDtypeMatchesInput (softmax family, plus ints)
    x = jnp.zeros((3,), dtype)
    for ours, theirs in [
        (sl.softmax, jax.nn.softmax),
        (sl.log_softmax, jax.nn.log_softmax),
        (sl.softplus, jax.nn.softplus),
    ]:
        assert ours(x).dtype == _reference(theirs, x).dtype


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.int64, jnp.int32], ids=str)
def test_x64_dtypes_match_jax_nn(dtype):
    # origin: jax tests/nn_test.py testDtypeMatchesInput, run as JAX's CI does with x64
    with jax.enable_x64(True):
        x = jnp.array([0, 1, 2], dtype)
        for ours, theirs in [
            (sl.softmax, jax.nn.softmax),
            (sl.log_softmax, jax.nn.log_softmax),
            (sl.softplus, jax.nn.softplus),
        ]:
            out, ref = ours(x), _reference(theirs, x)
            assert out.dtype == ref.dtype
            np.testing.assert_allclose(
                out, ref, rtol=1e-13 if out.dtype == jnp.float64 else 1e-6
            )


# ---------------------------------------------------------------------------------------
# softplus


def test_softplus_grad_small():
    # origin: jax tests/nn_test.py testSoftplusGrad (order 4 there; 2 keeps this fast)
    with sl.forward_mode():
        check_grads(jax.jit(sl.softplus), (1e-8,), order=2)


@pytest.mark.parametrize("point", [0.0, -float("inf"), float("nan")], ids=str)
def test_softplus_grad_points(point):
    # origin: jax tests/nn_test.py testSoftplusGradZero, testSoftplusGradNegInf,
    # testSoftplusGradNan
    with sl.forward_mode():
        check_grads(jax.jit(sl.softplus), (point,), order=1)


def test_softplus_grad_inf():
    # origin: jax tests/nn_test.py testSoftplusGradInf
    assert jax.grad(sl.softplus)(float("inf")) == 1.0


@pytest.mark.parametrize(
    "dtype",
    [int, float, jnp.float16, jnp.bfloat16, jnp.float32, jnp.int8, jnp.int32, jnp.uint8],
    ids=lambda d: getattr(d, "__name__", str(d)),
)
def test_softplus_zero(dtype):
    # origin: jax tests/nn_test.py testSoftplusZero
    assert sl.softplus(dtype(0)) == jnp.log(dtype(2))


def test_softplus_value():
    # origin: jax tests/nn_test.py testSoftplusValue
    _close(sl.softplus(89.0), 89.0, atol=0)


# ---------------------------------------------------------------------------------------
# dot_product_attention

B, S, T, N, H = 2, 8, 8, 4, 8


def _qkv(dtype=jnp.float32, groups=1, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(k[0], (B, T, N, H), dtype)
    key = jax.random.normal(k[1], (B, S, N // groups, H), dtype)
    value = jax.random.normal(k[2], (B, S, N // groups, H), dtype)
    grad = jax.random.normal(k[3], (B, T, N, H), dtype)
    bias = jax.random.normal(k[4], (1, N, T, S), dtype)
    return q, key, value, grad, bias


@pytest.mark.parametrize(
    "groups,use_vmap,impl",
    [
        (1, False, None),
        (2, True, None),
        (2, False, "xla"),
    ],
)
def test_dot_product_attention_gqa(groups, use_vmap, impl):
    # origin: jax tests/nn_test.py testDotProductAttention (bfloat16, GQA, vmap, impl)
    q, k, v, grad, _ = _qkv(jnp.bfloat16, groups)
    ours = functools.partial(sl.dot_product_attention, implementation=impl)
    if use_vmap:
        ours = jax.vmap(ours, in_axes=(0, 0, 0, None, None))
    k_ref, v_ref = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    out_ref, vjp_ref = jax.vjp(jax.nn.dot_product_attention, q, k_ref, v_ref, None, None)
    out, vjp = jax.vjp(ours, q, k, v, None, None)
    dq_ref, dk_ref, dv_ref = vjp_ref(grad)[:3]
    dq, dk, dv = vjp(grad)[:3]
    dk_ref = dk_ref.reshape(B, S, N // groups, groups, H).sum(3)
    dv_ref = dv_ref.reshape(B, S, N // groups, groups, H).sum(3)
    _close(out, out_ref, atol=0.02)
    for a, b in [(dq, dq_ref), (dk, dk_ref), (dv, dv_ref)]:
        _close(a, b, atol=0.05)


def _mask_inputs(mode):
    q, k, v, grad, bias_ = _qkv(jnp.float32, seed=1)
    kwargs, ours_kwargs = {}, {}
    bias = bias_ if "bias" in mode else None
    mask = jnp.tril(jnp.ones((T, S), bool))[None, None] if "custom" in mode else None
    if "causal" in mode:
        kwargs["is_causal"] = ours_kwargs["is_causal"] = True
    if "padding" in mode:
        q_len = jnp.array([T // 2, T // 4], jnp.int32)
        kv_len = jnp.array([S // 4, S // 2], jnp.int32)
        kwargs.update(query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
        ours_kwargs.update(query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    if "sliding_window" in mode:
        # Causal, so the right side of jax's (left, right) window has no effect: (3, 0),
        # a look-back only, is the same window.
        kwargs["local_window_size"] = (3, 2)
        ours_kwargs["local_window_size"] = (3, 0)
    return (q, k, v, bias, mask), grad, kwargs, ours_kwargs


MASK_MODES = [
    ("bias",),
    ("causal",),
    ("padding",),
    ("custom",),
    ("causal", "padding"),
    ("custom", "padding"),
    ("bias", "causal"),
    ("causal", "sliding_window"),
]


def _compare_vjp(ours, ref, args, grad, atol=2e-5):
    out, vjp = jax.vjp(ours, *args)  # first: a missing keyword fails before any work
    out_ref, vjp_ref = jax.vjp(ref, *args)
    _close(out, out_ref, atol=atol)
    for a, b in zip(vjp(grad)[:4], vjp_ref(grad)[:4], strict=True):
        if b is not None:
            _close(a, b, atol=atol * 10)


@pytest.mark.parametrize("mode", MASK_MODES, ids="+".join)
def test_dot_product_attention_mask_look_back_window(mode):
    # origin: jax tests/nn_test.py testDotProductAttentionMask, with a causal window spelled
    # as a look-back only ((left, 0)) and the default implementation
    args, grad, kwargs, ours_kwargs = _mask_inputs(mode)
    ref = functools.partial(jax.nn.dot_product_attention, **kwargs)
    ours = functools.partial(sl.dot_product_attention, **ours_kwargs)
    _compare_vjp(ours, ref, args, grad)


@pytest.mark.parametrize("mode", MASK_MODES, ids="+".join)
def test_dot_product_attention_mask_jax_keywords(mode):
    # origin: jax tests/nn_test.py testDotProductAttentionMask, called with jax.nn's own
    # keywords and implementation='xla', as code written for jax.nn calls it
    args, grad, kwargs, _ = _mask_inputs(mode)
    ref = functools.partial(jax.nn.dot_product_attention, implementation="xla", **kwargs)
    ours = functools.partial(sl.dot_product_attention, implementation="xla", **kwargs)
    _compare_vjp(ours, ref, args, grad)


@pytest.mark.parametrize("window", [(1, 1), (2, 0), (0, 3)], ids=str)
def test_local_window_two_sided(window):
    # origin: jax tests/nn_test.py testDotProductAttentionMask ('sliding_window'), with a
    # window that also reaches right and no causal mask
    (q, k, v, _, _), grad, _, _ = _mask_inputs(())
    ref = functools.partial(jax.nn.dot_product_attention, local_window_size=window)
    ours = functools.partial(sl.dot_product_attention, local_window_size=window)
    _compare_vjp(lambda q, k, v: ours(q, k, v), lambda q, k, v: ref(q, k, v), (q, k, v), grad)


def test_local_window_two_sided_as_mask():
    # origin: jax tests/nn_test.py testDotProductAttentionMask ('sliding_window'); today's
    # spelling: the (left, right) band as a mask
    (q, k, v, _, _), grad, _, _ = _mask_inputs(())
    i, j = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    band = (j >= i - 1) & (j <= i + 2)
    ref = functools.partial(jax.nn.dot_product_attention, local_window_size=(1, 2))
    ours = functools.partial(sl.dot_product_attention, mask=band)
    _compare_vjp(lambda q, k, v: ours(q, k, v), lambda q, k, v: ref(q, k, v), (q, k, v), grad)


@pytest.mark.parametrize("batch,use_vmap", [(1, False), (3, True)])
def test_dot_product_attention_bias_gradient(batch, use_vmap):
    # origin: jax tests/nn_test.py testDotProductAttentionBiasGradient (cuDNN's batch-1
    # limit does not apply: the bias gradient is checked for every batch size)
    kx, kb = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, S, N, H))
    bias = jax.random.normal(kb, (batch, N, S, S))
    mask = jnp.ones((1, 1, S), bool)

    def attention(fn, x, bias, mask):
        return fn(x, x, x, bias=bias, mask=mask, is_causal=False)

    ref = functools.partial(attention, jax.nn.dot_product_attention)
    ours = functools.partial(attention, sl.dot_product_attention)
    if use_vmap:
        ref, ours = (jax.vmap(f, in_axes=(0, 0, None)) for f in (ref, ours))
    _close(jax.jit(ours)(x, bias, mask), jax.jit(ref)(x, bias, mask), atol=2e-5)
    dbias = jax.jit(lambda fn, *args: jax.vjp(fn, *args)[1](args[0])[1], static_argnums=0)
    _close(dbias(ours, x, bias, mask), dbias(ref, x, bias, mask), atol=2e-4)


def test_return_residual():
    # origin: jax tests/nn_test.py (return_residual of jax.nn.dot_product_attention, as its
    # docstring and the cuDNN tests use it)
    q, k, v, _, _ = _qkv(jnp.bfloat16)
    out, res = sl.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    out_ref, res_ref = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, return_residual=True
    )
    assert res.shape == res_ref.shape == (B, T, N)
    assert res.dtype == res_ref.dtype == k.dtype
    _close(out, out_ref, atol=0.02)
    _close(res, res_ref, atol=0.05)
    grad = jax.grad(
        lambda q: (
            sl.dot_product_attention(q, k, v, return_residual=True)[1].astype(jnp.float32).sum()
        )
    )(q)
    assert not jnp.any(grad)


def test_logsumexp_is_the_residual_today():
    # origin: jax tests/nn_test.py (return_residual); today's spelling, return_logsumexp,
    # is float32 and laid out (B, N, T)
    q, k, v, _, _ = _qkv(jnp.float32)
    out_ref, res_ref = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, return_residual=True
    )
    out, lse = sl.dot_product_attention(q, k, v, is_causal=True, return_logsumexp=True)
    _close(out, out_ref, atol=2e-5)
    _close(jnp.swapaxes(lse, -1, -2), res_ref, atol=2e-5)


@pytest.mark.parametrize(
    "impl",
    ["xla", "cudnn"],
)
def test_implementation_names(impl):
    # origin: jax tests/nn_test.py testDotProductAttention (impl='xla'/'cudnn'); 'cudnn'
    # needs a GPU in jax as well, so on this CPU both must give an answer or raise alike
    q, k, v, _, _ = _qkv(jnp.bfloat16)
    try:
        expected = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    except Exception as err:  # jax without cuDNN raises; any type
        with pytest.raises(Exception):  # noqa: B017
            sl.dot_product_attention(q, k, v, implementation=impl)
        assert err is not None
        return
    _close(sl.dot_product_attention(q, k, v, implementation=impl), expected, atol=0.02)


def test_fully_masked_query_documented_difference():
    # origin: jax tests/nn_test.py testDotProductAttentionMask (a custom mask); a query row
    # with no key left. documented difference (docs/semantics.md, attention): jax.nn gives
    # the mean of the values, stablelayers exactly 0 with no gradient.
    q, k, v, _, _ = _qkv(jnp.float32)
    mask = jnp.ones((T, S), bool).at[0].set(False)[None, None]
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    out = sl.dot_product_attention(q, k, v, mask=mask)
    _close(ref[:, 0], jnp.repeat(v.mean(1), 1, axis=1), atol=1e-5)
    np.testing.assert_array_equal(out[:, 0], 0.0)
    _close(out[:, 1:], ref[:, 1:], atol=2e-5)
