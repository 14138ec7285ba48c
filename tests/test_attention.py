"""stablelayers.dot_product_attention, with no framework installed."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _edge_inputs import attention_inputs
from jax.test_util import check_grads

import stablelayers as sl

# Jitted, so that each test compiles once instead of dispatching (and compiling) op by op.
attend = jax.jit(
    sl.dot_product_attention,
    static_argnames=(
        "scale",
        "is_causal",
        "dropout_rate",
        "broadcast_dropout",
        "deterministic",
        "dtype",
        "precision",
        "qk_attn_weights_einsum",
        "attn_weights_value_einsum",
    ),
)


def _inputs(batch=(2,), q_len=4, kv_len=5, heads=4, kv_heads=None, qk_dim=8, v_dim=3, seed=0):
    # numpy, not jax.random: eager jax.random compiles anew for every shape, which is slow.
    kv_heads = heads if kv_heads is None else kv_heads
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((*batch, q_len, heads, qk_dim), np.float32)
    key = rng.standard_normal((*batch, kv_len, kv_heads, qk_dim), np.float32)
    value = rng.standard_normal((*batch, kv_len, kv_heads, v_dim), np.float32)
    return jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)


def _normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _key(seed):
    # rbg keys: the same semantics as the default threefry keys, and several times faster
    # to compile on CPU, where compiling dominates these tests' run time.
    return jax.random.key(seed, impl="rbg")


def _mask(shape, seed=1, empty_row=None):
    """A random mask whose rows each keep key 0, except ``empty_row`` (an index tuple)."""
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[..., 0] = True
    if empty_row is not None:
        mask[empty_row] = False
    return jnp.asarray(mask)


@jax.jit
def _reference(query, key, value, bias=None, mask=None, sink=None, scale=None):
    """Plain attention with jax.nn.softmax; the sink is an extra key with a zero value."""
    groups = query.shape[-2] // key.shape[-2]
    key, value = jnp.repeat(key, groups, axis=-2), jnp.repeat(value, groups, axis=-2)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key) * scale
    if bias is not None:
        logits = logits + jnp.broadcast_to(bias, logits.shape)
    where = None if mask is None else jnp.broadcast_to(mask, logits.shape)
    if sink is not None:
        sink = jnp.broadcast_to(jnp.asarray(sink)[..., None, None], (*logits.shape[:-1], 1))
        logits = jnp.concatenate([logits, sink], axis=-1)
        value = jnp.concatenate([value, jnp.zeros_like(value[..., :1, :, :])], axis=-3)
        if where is not None:
            where = jnp.concatenate([where, jnp.ones_like(where[..., :1])], axis=-1)
    weights = jax.nn.softmax(logits, where=where)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_matches_reference_any_batch_dims(batch):
    query, key, value = _inputs(batch=batch)
    mask = _mask((*batch, 4, 4, 5))
    bias = _normal((4, 4, 5), seed=7)
    out = attend(query, key, value, bias, mask)
    assert out.shape == (*batch, 4, 4, 3)
    np.testing.assert_allclose(out, _reference(query, key, value, bias, mask), atol=1e-5)


def test_matches_jax_nn_dot_product_attention():
    query, key, value = _inputs(v_dim=8)
    mask = _mask((2, 1, 4, 5))
    reference = jax.jit(jax.nn.dot_product_attention, static_argnames="is_causal")
    expected = reference(query, key, value, mask=mask)
    np.testing.assert_allclose(attend(query, key, value, mask=mask), expected, atol=1e-5)
    expected = reference(query, key, value, is_causal=True)
    np.testing.assert_allclose(attend(query, key, value, is_causal=True), expected, atol=1e-5)


def test_grouped_query_attention():
    query, key, value = _inputs(heads=6, kv_heads=2)
    mask = _mask((2, 6, 4, 5))
    out = attend(query, key, value, mask=mask)
    np.testing.assert_allclose(out, _reference(query, key, value, mask=mask), atol=1e-5)


def test_is_causal_is_a_top_left_lower_triangular_mask():
    query, key, value = _inputs(q_len=5, kv_len=5)
    mask = _mask((2, 4, 5, 5))
    causal = jnp.tril(jnp.ones((5, 5), bool))
    out = attend(query, key, value, mask=mask, is_causal=True)
    both = mask & jnp.broadcast_to(causal, mask.shape)
    np.testing.assert_array_equal(out, attend(query, key, value, mask=both))


def test_float_masks_from_make_attention_mask_count_nonzero_as_kept():
    query, key, value = _inputs()
    mask = _mask((2, 1, 4, 5))
    np.testing.assert_array_equal(
        attend(query, key, value, mask=mask.astype(jnp.float32)),
        attend(query, key, value, mask=mask),
    )


def test_scale():
    query, key, value = _inputs()
    out = attend(query, key, value, scale=0.3)
    np.testing.assert_allclose(out, _reference(query, key, value, scale=0.3), atol=1e-5)


@pytest.mark.parametrize("sink_shape", [(4,), (2, 4)])
def test_sink_is_an_extra_key_with_a_zero_value(sink_shape):
    query, key, value = _inputs()
    mask = _mask((2, 4, 4, 5))
    sink = _normal(sink_shape, seed=3)
    out = attend(query, key, value, mask=mask, sink=sink)
    expected = _reference(query, key, value, mask=mask, sink=sink)
    np.testing.assert_allclose(out, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Fully masked rows
# ---------------------------------------------------------------------------------------


def test_fully_masked_query_row_is_exactly_zero_with_zero_gradient():
    query, key, value = _inputs()
    mask = _mask((2, 4, 4, 5), empty_row=(1, 2, 3))  # batch 1, head 2, query 3
    bias = jnp.zeros((4, 4, 5))

    def attend_masked(query, key, value, bias):
        return attend(query, key, value, bias, mask)

    out = attend_masked(query, key, value, bias)
    np.testing.assert_array_equal(out[1, 3, 2], 0.0)

    # The empty row's output is constant: it sends exactly 0 to every input.
    row_grads = jax.grad(lambda *a: attend_masked(*a)[1, 3, 2].sum(), argnums=(0, 1, 2, 3))(
        query, key, value, bias
    )
    for g in row_grads:
        np.testing.assert_array_equal(g, 0.0)
    # And a loss over every row has finite gradients.
    grads = jax.grad(lambda *a: jnp.sum(attend_masked(*a) ** 2), argnums=(0, 1, 2, 3))(
        query, key, value, bias
    )
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_minus_inf_bias_masks_like_mask():
    query, key, value = _inputs()
    mask = _mask((2, 4, 4, 5), empty_row=(0, 1, 2))
    bias = jnp.where(mask, 0.0, -jnp.inf)
    out = attend(query, key, value, bias)
    # Equal up to rounding: without a mask the softmax may run the CPU row kernel.
    np.testing.assert_allclose(out, attend(query, key, value, mask=mask), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[0, 2, 1], 0.0)
    grads = jax.grad(lambda q: jnp.sum(attend(q, key, value, bias)))(query)
    assert np.all(np.isfinite(grads))


def test_dropout_keeps_empty_rows_zero():
    query, key, value = _inputs()
    mask = _mask((2, 4, 4, 5), empty_row=(1, 0, 0))
    out = attend(
        query,
        key,
        value,
        mask=mask,
        dropout_rng=_key(5),
        dropout_rate=0.5,
        deterministic=False,
    )
    np.testing.assert_array_equal(out[1, 0, 0], 0.0)


# ---------------------------------------------------------------------------------------
# Gradients (float64 finite differences; forward mode cannot pass through custom_vjp)
# ---------------------------------------------------------------------------------------


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        query, key, value = (a.astype(jnp.float64) for a in _inputs(batch=(1,), heads=2))
        mask = _mask((1, 2, 4, 5), empty_row=(0, 1, 2))
        bias = 0.1 * _normal((2, 4, 5), seed=4).astype(jnp.float64)
        sink = jnp.array([0.3, -1.2])

        def attend_masked(query, key, value, bias, sink):
            return attend(query, key, value, bias, mask, sink=sink)

        check_grads(attend_masked, (query, key, value, bias, sink), order=1, modes=("rev",))


def test_sink_gradient_matches_finite_differences_when_rows_are_empty():
    with jax.enable_x64(True):
        query, key, value = (a.astype(jnp.float64) for a in _inputs(batch=(1,), heads=2))
        mask = _mask((1, 2, 4, 5), empty_row=(0, 0))  # every query of head 0 is empty
        sink = jnp.array([2.0, -0.5])
        check_grads(
            lambda s: attend(query, key, value, mask=mask, sink=s),
            (sink,),
            order=1,
            modes=("rev",),
        )


# ---------------------------------------------------------------------------------------
# dtype, precision, dropout and the Flax keywords
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_returns_input_dtype_and_computes_logits_in_float32(dtype):
    query, key, value = _inputs()
    mask = _mask((2, 4, 4, 5))
    out = attend(*(a.astype(dtype) for a in (query, key, value)), mask=mask)
    assert out.dtype == dtype
    expected = _reference(
        *(a.astype(dtype).astype(jnp.float32) for a in (query, key, value)), mask=mask
    )
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=3e-2)

    # Logits of 9e4 overflow float16 (max 65504); in float32 they are ordinary.
    big = jnp.full((1, 2, 1, 1), 300.0, dtype)
    values = jnp.array([1.0, 2.0], dtype).reshape(1, 2, 1, 1)
    out = attend(big, big, values, scale=1.0)
    np.testing.assert_allclose(out.astype(jnp.float32), 1.5, rtol=1e-2)


def test_dtype_argument_sets_the_computation_and_output_dtype():
    query, key, value = _inputs()
    out = attend(query, key, value, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        out.astype(jnp.float32), _reference(query, key, value), atol=3e-2
    )


def test_precision_reaches_both_einsums():
    query, key, value = _inputs()
    jaxpr = str(
        jax.make_jaxpr(
            lambda q, k, v: sl.dot_product_attention(
                q, k, v, precision=jax.lax.Precision.HIGHEST
            )
        )(query, key, value)
    )
    assert jaxpr.count("Precision.HIGHEST") >= 2


@pytest.mark.parametrize("broadcast_dropout", [True, False])
def test_dropout_matches_flax_pattern(broadcast_dropout):
    query, key, value = _inputs()
    mask = _mask((2, 4, 4, 5))
    rng, rate = _key(11), 0.3
    out = attend(
        query,
        key,
        value,
        mask=mask,
        dropout_rng=rng,
        dropout_rate=rate,
        broadcast_dropout=broadcast_dropout,
        deterministic=False,
    )
    # Flax's draw: one (q_len, kv_len) pattern shared by batch and heads, or one per entry.
    shape = (1, 1, 4, 5) if broadcast_dropout else (2, 4, 4, 5)

    @jax.jit
    def expected(query, key, value, mask, rng):
        keep = jax.random.bernoulli(rng, 1 - rate, shape)
        logits = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(8.0)
        weights = jax.nn.softmax(logits, where=mask) * keep / (1 - rate)
        return jnp.einsum("...hqk,...khd->...qhd", weights, value)

    np.testing.assert_allclose(out, expected(query, key, value, mask, rng), atol=1e-5)
    if broadcast_dropout:
        # deterministic=True, or a rate of 0, switches dropout off.
        plain = attend(query, key, value, mask=mask)
        for kwargs in ({"deterministic": True, "dropout_rate": rate}, {"deterministic": False}):
            np.testing.assert_array_equal(
                attend(query, key, value, mask=mask, dropout_rng=rng, **kwargs), plain
            )


def test_traced_dropout_rate():
    query, key, value = _inputs()
    attend_at = jax.jit(
        lambda rate: sl.dot_product_attention(
            query,
            key,
            value,
            dropout_rng=_key(0),
            dropout_rate=rate,
            deterministic=False,
        )
    )
    assert np.all(np.isfinite(attend_at(jnp.float32(0.2))))


def test_module_receives_the_weights_before_dropout():
    class Recorder:
        def __init__(self):
            self.calls = []

        def sow(self, collection, name, value):
            self.calls.append((collection, name, value))

    query, key, value = _inputs()
    mask = _mask((2, 4, 4, 5))
    recorder = Recorder()

    @jax.jit
    def sown_weights(query, key, value, mask):
        sl.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            module=recorder,
            dropout_rng=_key(0),
            dropout_rate=0.5,
            deterministic=False,
        )
        [(collection, name, weights)] = recorder.calls
        assert (collection, name) == ("intermediates", "attention_weights")
        logits = jnp.einsum("...qhd,...khd->...hqk", query, key) / jnp.sqrt(8.0)
        return weights, jax.nn.softmax(logits, where=mask)

    weights, expected = sown_weights(query, key, value, mask)
    np.testing.assert_allclose(weights, expected, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_custom_einsums_are_used(kv_heads):
    calls = []

    def einsum(subscripts, a, b):
        calls.append(subscripts)
        return jnp.einsum(subscripts, a, b)

    query, key, value = _inputs(kv_heads=kv_heads)
    out = attend(
        query, key, value, qk_attn_weights_einsum=einsum, attn_weights_value_einsum=einsum
    )
    assert calls == ["...qhd,...khd->...hqk", "...hqk,...khd->...qhd"]
    np.testing.assert_allclose(out, _reference(query, key, value), atol=1e-5)


# ---------------------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------------------


def test_vmap_and_grad_under_jit():
    # `attend`, used throughout, is already jitted.
    query, key, value = _inputs()
    mask = _mask((2, 4, 4, 5), empty_row=(0, 0, 0))
    sink = jnp.zeros(4)

    def attend_masked(q, k, v, m, s):
        return sl.dot_product_attention(q, k, v, mask=m, sink=s)

    vmapped = jax.jit(jax.vmap(attend_masked, in_axes=(0, 0, 0, 0, None)))
    expected = attend(query, key, value, mask=mask, sink=sink)
    np.testing.assert_allclose(vmapped(query, key, value, mask, sink), expected, atol=1e-6)
    loss = lambda *a: jnp.sum(attend_masked(*a) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4)))(query, key, value, mask, sink)
    assert all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_errors():
    query, key, value = _inputs()
    with pytest.raises(ValueError, match="same rank"):
        sl.dot_product_attention(query[0], key, value)
    with pytest.raises(ValueError, match="batch dimensions"):
        sl.dot_product_attention(query[:1], key, value)
    with pytest.raises(ValueError, match="head dimensions"):
        sl.dot_product_attention(query[..., :4], key, value)
    with pytest.raises(ValueError, match="length and number of heads"):
        sl.dot_product_attention(query, key, value[:, :3])
    with pytest.raises(ValueError, match="not a multiple"):
        sl.dot_product_attention(query, key[..., :3, :], value[..., :3, :])
    with pytest.raises(ValueError, match="`mask` of shape"):
        sl.dot_product_attention(query, key, value, mask=jnp.ones((3, 5), bool))
    with pytest.raises(ValueError, match="`bias` of shape"):
        sl.dot_product_attention(query, key, value, bias=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="`sink` of shape"):
        sl.dot_product_attention(query, key, value, sink=jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match="dropout_rng"):
        sl.dot_product_attention(query, key, value, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match="dropout_rate"):
        sl.dot_product_attention(query, key, value, dropout_rate=1.0)
    with pytest.raises(ValueError, match="together"):
        sl.dot_product_attention(query, key, value, qk_attn_weights_einsum=jnp.einsum)
    with pytest.raises(ValueError, match="mutually exclusive"):
        sl.dot_product_attention(
            query,
            key,
            value,
            precision="highest",
            qk_attn_weights_einsum=jnp.einsum,
            attn_weights_value_einsum=jnp.einsum,
        )
    with pytest.raises(TypeError, match="real"):
        sl.dot_product_attention(query.astype(jnp.complex64), key, value)


def test_importing_stablelayers_imports_no_framework():
    code = (
        "import sys, stablelayers, stablelayers._layers\n"
        "loaded = {'flax', 'equinox'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# Padding, empty keys and argument kinds, on both implementations
# ---------------------------------------------------------------------------------------


# NaN or inf in keys, values or queries past the lengths (padding) once turned outputs and
# gradients NaN on both paths (a zero weight times NaN).
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@pytest.mark.parametrize("padding", ["lengths", "mask"])
def test_padding_contributes_nothing_whatever_it_holds(implementation, padding):
    q, k, v = attention_inputs()
    q_lengths, kv_lengths = jnp.array([6, 8]), jnp.array([5, 3])
    if padding == "lengths":
        options = {"query_seq_lengths": q_lengths, "key_value_seq_lengths": kv_lengths}
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


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_logsumexp_with_zero_keys_is_minus_inf(implementation):
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
def test_dropout_rate_is_checked_for_every_kind_of_number(rate, implementation):
    q, k, v = attention_inputs()
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


@pytest.mark.parametrize("left", [np.int64(1), np.int32(1), jnp.int32(1), 1])
def test_local_window_size_takes_any_integer_scalar(left):
    q, k, v = attention_inputs()
    reference = sl.dot_product_attention(q, k, v, local_window_size=(1, 0), is_causal=True)
    np.testing.assert_array_equal(
        sl.dot_product_attention(q, k, v, local_window_size=(left, 0), is_causal=True),
        reference,
    )


# Issue 22: one spelling per argument, jax.nn's; the others are gone, not aliased.
@pytest.mark.parametrize(
    "removed", ["query_lengths", "key_lengths", "window"], ids=lambda name: name
)
def test_removed_argument_spellings_raise_type_error(removed):
    q, k, v = attention_inputs()
    value = 2 if removed == "window" else jnp.array([3, 5])
    unexpected = f"unexpected keyword argument '{removed}'"
    with pytest.raises(TypeError, match=unexpected):
        sl.dot_product_attention(q, k, v, **{removed: value})
    if removed == "window":
        return
    with pytest.raises(TypeError, match=unexpected):
        sl.ring_attention(q, k, v, axis_name="sp", **{removed: value})
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
    with pytest.raises(TypeError, match=unexpected):
        sl.ring_attention_sharded(q, k, v, mesh=mesh, axis_name="sp", **{removed: value})


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
def test_malformed_chunk_size_says_what_is_expected(chunk_size, error):
    q, k, v = attention_inputs()
    with pytest.raises(error, match="chunk_size"):
        sl.dot_product_attention(q, k, v, implementation="chunked", chunk_size=chunk_size)
