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


def _attention_inputs(b=2, t=8, s=8, n=2, h=4):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, s, n, h))
    v = jax.random.normal(keys[2], (b, s, n, h))
    return q, k, v


# Defect 4 (attention): NaN or inf in keys, values or queries past the lengths (padding)
# turned outputs and gradients NaN on both paths (a zero weight times NaN).
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@pytest.mark.parametrize("padding", ["lengths", "mask"])
def test_defect_4_padding_contributes_nothing_whatever_it_holds(implementation, padding):
    q, k, v = _attention_inputs()
    q_lengths, kv_lengths = jnp.array([6, 8]), jnp.array([5, 3])
    if padding == "lengths":
        options = {"query_lengths": q_lengths, "key_lengths": kv_lengths}
    else:
        rows = jnp.arange(8)[None, :] < q_lengths[:, None]
        cols = jnp.arange(8)[None, :] < kv_lengths[:, None]
        options = {"mask": rows[:, None, :, None] & cols[:, None, None, :]}

    def attend(q, k, v):
        out = sl.dot_product_attention(
            q, k, v, implementation=implementation, chunk_size=4, **options
        )
        return jnp.sum(out * jnp.cos(out))

    poisoned = (
        q.at[0, 6:].set(jnp.nan),
        k.at[0, 5:].set(jnp.nan).at[1, 3:].set(jnp.inf),
        v.at[0, 5:].set(-jnp.inf).at[1, 3:].set(jnp.nan),
    )
    clean_value, clean_grads = jax.value_and_grad(attend, argnums=(0, 1, 2))(q, k, v)
    value, grads = jax.value_and_grad(attend, argnums=(0, 1, 2))(*poisoned)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    for grad, clean in zip(grads, clean_grads, strict=True):
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, clean, rtol=1e-5, atol=1e-6)
    # The padding's own gradients are exactly zero.
    assert np.all(grads[0][0, 6:] == 0) and np.all(grads[1][0, 5:] == 0)
    assert np.all(grads[2][1, 3:] == 0)


# Defect 5: unclear errors and silent wrong answers in attention's arguments.
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_defect_5_logsumexp_with_zero_keys_is_minus_inf(implementation):
    q = jnp.ones((2, 3, 2, 4))
    empty = jnp.ones((2, 0, 2, 4))
    out, lse = sl.dot_product_attention(
        q, empty, empty, return_logsumexp=True, implementation=implementation
    )
    assert out.shape == q.shape and np.all(out == 0)
    assert lse.shape == (2, 2, 3) and np.all(lse == -np.inf)
    _, with_sink = sl.dot_product_attention(
        q, empty, empty, sink=jnp.array([0.5, 1.0]), return_logsumexp=True
    )
    np.testing.assert_array_equal(with_sink[0, :, 0], [0.5, 1.0])


@pytest.mark.parametrize(
    "rate", [1.0, np.float32(1.0), jnp.float32(1.0), -0.5, np.float64(-0.5), jnp.array(1.5)]
)
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_defect_5_dropout_rate_is_checked_for_every_kind_of_number(rate, implementation):
    q, k, v = _attention_inputs()
    with pytest.raises(ValueError, match=r"dropout_rate.*\[0, 1\)"):
        sl.dot_product_attention(
            q,
            k,
            v,
            dropout_rate=rate,
            deterministic=False,
            dropout_rng=jax.random.key(1),
            implementation=implementation,
        )


@pytest.mark.parametrize("window", [np.int64(2), np.int32(2), jnp.int32(2), 2])
def test_defect_5_window_takes_any_integer_scalar(window):
    q, k, v = _attention_inputs()
    reference = sl.dot_product_attention(q, k, v, window=2, is_causal=True)
    np.testing.assert_array_equal(
        sl.dot_product_attention(q, k, v, window=window, is_causal=True), reference
    )


@pytest.mark.parametrize(
    ("chunk_size", "error"),
    [
        ((4,), ValueError),
        ((4, 2, 1), ValueError),
        ("64", TypeError),
        ((4, 0), ValueError),
        (2.5, TypeError),
        (0, ValueError),
    ],
)
def test_defect_5_malformed_chunk_size_says_what_is_expected(chunk_size, error):
    q, k, v = _attention_inputs()
    with pytest.raises(error, match="chunk_size"):
        sl.dot_product_attention(q, k, v, implementation="chunked", chunk_size=chunk_size)


def test_defect_5_exporting_with_the_kernels_names_the_way_out():
    from stablelayers._cpu import library as _cpu_library

    if not _cpu_library.available():
        pytest.skip("the CPU kernels are not in this build")
    with pytest.raises(ValueError, match="to_export_trace_inside_stablelayers_pure_jax"):
        jax.export.export(jax.jit(sl.softmax))(jnp.zeros((2, 3)))
    with sl.pure_jax():
        jax.export.export(jax.jit(sl.softmax))(jnp.zeros((2, 3)))


# Defect 6: under jax_numpy_rank_promotion="raise" (the peers' test setting) attention
# raised on the chunked path, with lengths, and with a 2-D bias; jax.nn does not.
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True, "window": 3},
        {"query_lengths": jnp.array([3, 8]), "key_lengths": jnp.array([5, 2])},
        {"bias": jnp.ones((8, 8))},
        {"mask": jnp.ones((8, 8), bool), "sink": jnp.zeros(2)},
    ],
    ids=["plain", "causal-window", "lengths", "2d-bias", "2d-mask-sink"],
)
def test_defect_6_attention_under_rank_promotion_raise(implementation, options):
    q, k, v = _attention_inputs()
    with jax.numpy_rank_promotion("raise"):
        grads = jax.grad(
            lambda q, k, v: jnp.sum(
                sl.dot_product_attention(
                    q, k, v, implementation=implementation, chunk_size=4, **options
                )
            ),
            argnums=(0, 1, 2),
        )(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)


# Defect 6 (debug_infs): masked attention and plain softmax on the pure-JAX path raised
# FloatingPointError in eager mode (masked logits became -inf inside).
_EAGER_CALLS = {
    "softmax": lambda x, m: sl.softmax(x),
    "softmax-where": lambda x, m: sl.softmax(x, where=m),
    "log_softmax": lambda x, m: sl.log_softmax(x),
    "masked_softmax-sink": lambda x, m: sl.masked_softmax(x, where=m, sink=jnp.zeros(2)),
    "softmax-where-grad": lambda x, m: jax.grad(lambda x: jnp.sum(sl.softmax(x, where=m) * x))(
        x
    ),
    "softplus": lambda x, m: sl.softplus(x, 2.0),
}


@pytest.mark.parametrize("path", ["kernels", "pure_jax"])
@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("name", sorted(_EAGER_CALLS))
def test_defect_6_ops_run_under_debug_infs_and_debug_nans(name, mode, path):
    x = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    m = jnp.array([[True, False, True], [False, False, False]])
    call = _EAGER_CALLS[name]
    call = call if mode == "eager" else jax.jit(call)
    with sl.pure_jax() if path == "pure_jax" else _nothing():
        with jax.debug_infs(True), jax.debug_nans(True):
            assert np.all(np.isfinite(call(x, m)))


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_defect_6_masked_attention_runs_under_debug_infs(implementation, mode):
    q, k, v = _attention_inputs()

    def loss(q, k, v):
        out = sl.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            key_lengths=jnp.array([5, 3]),
            query_lengths=jnp.array([8, 6]),
            implementation=implementation,
            chunk_size=4,
        )
        return jnp.sum(out * out)

    call = jax.value_and_grad(loss, argnums=(0, 1, 2))
    call = call if mode == "eager" else jax.jit(call)
    with jax.debug_infs(True), jax.debug_nans(True):
        value, grads = call(q, k, v)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


# Defect 7: the CPU kernels and the pure-JAX path disagreed on rows holding NaN (0 where
# exp underflows in long rows; a one-hot where XLA's max dropped the NaN next to +inf) and
# on log_softmax's backward with non-finite cotangents. The rule (docs/semantics.md): a
# NaN in an unmasked place makes every entry of its row NaN except the -inf ones.
def _nan_rows(n):
    rng = np.random.default_rng(n)
    rows = rng.normal(size=(4, n)).astype(np.float32) * 50
    rows[0, n // 2] = np.nan
    rows[1, 0], rows[1, n - 1] = np.inf, np.nan
    rows[2, 1 % n], rows[2, 0] = -np.inf, np.nan
    rows[3, :] = -200.0
    rows[3, n - 1] = np.nan
    return rows


@pytest.mark.parametrize("n", [4, 17, 1023, 1024, 1025, 4096])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_defect_7_nan_rows_follow_one_rule_on_both_paths(name, n):
    op = getattr(sl, name)
    x = _nan_rows(n)
    kernels = np.asarray(jax.jit(op)(x))
    with sl.pure_jax():
        pure = np.asarray(jax.jit(op)(x))
    gone = -np.inf if name == "log_softmax" else 0.0
    expected = np.where(x == -np.inf, gone, np.nan)
    np.testing.assert_array_equal(kernels, expected)
    np.testing.assert_array_equal(pure, expected)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_defect_7_log_softmax_backward_with_non_finite_cotangents_agrees(bad):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 40)).astype(np.float32))
    x = x.at[:, 5].set(-jnp.inf).at[2, 7].set(-200.0)
    g = jnp.ones_like(x).at[:, 3].set(bad)

    def vjp(x, g):
        return jax.vjp(sl.log_softmax, x)[1](g)[0]

    kernels = np.asarray(jax.jit(vjp)(x, g))
    with sl.pure_jax():
        pure = np.asarray(jax.jit(vjp)(x, g))
    np.testing.assert_array_equal(np.isnan(kernels), np.isnan(pure))
    np.testing.assert_array_equal(np.isinf(kernels), np.isinf(pure))
    finite = np.isfinite(pure)
    np.testing.assert_allclose(kernels[finite], pure[finite], rtol=1e-5, atol=1e-6)
    # A -inf logit neither takes nor gives gradient, whatever the cotangent.
    assert np.all(kernels[:, 5] == 0) and np.all(pure[:, 5] == 0)


@pytest.mark.parametrize("n", [4, 1025])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "masked_softmax"])
def test_defect_7_nan_rows_keep_masked_entries_exact(name, n):
    """Defect 7: in a row with an unmasked NaN, the masked entries stay exactly 0 (-inf for
    log_softmax) and every other unmasked entry but the -inf ones is NaN; a masked NaN
    changes nothing."""
    op = getattr(sl, name)
    x = _nan_rows(n)
    mask = np.ones_like(x, bool)
    mask[:, 2 % n] = False
    mask[0, n // 2] = False  # row 0's only NaN is masked: the row is finite
    with sl.pure_jax():
        y = np.asarray(jax.jit(lambda x, m: op(x, where=m))(x, mask))
    gone = -np.inf if name == "log_softmax" else 0.0
    np.testing.assert_array_equal(y[~mask], gone)
    assert np.all(np.isfinite(y[0][mask[0]]) | (y[0][mask[0]] == gone))
    live = mask[1:] & (x[1:] != -np.inf)
    assert np.all(np.isnan(y[1:][live]))
    np.testing.assert_array_equal(y[1:][mask[1:] & (x[1:] == -np.inf)], gone)
