"""implementation='cudnn': stablelayers' semantics around jax.nn's cuDNN attention.

There is no GPU here, so these tests run the same wrapper (attention/_cudnn.py) with
jax.nn's XLA implementation underneath (``_cudnn.BACKEND = "xla"``), which masks as cuDNN
does (a query with no key gets the mean of the values); they check it against
stablelayers' dense path, values and gradients, and that what cuDNN cannot do raises.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablelayers as sl
from stablelayers.attention import _cudnn


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(_cudnn, "BACKEND", "xla")


def _qkv(batch=(2,), q_len=6, kv_len=6, heads=2, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((*batch, q_len, heads, dim), (*batch, kv_len, kv_heads, dim))
    q = rng.standard_normal(shapes[0], np.float32)
    k, v = (rng.standard_normal(shapes[1], np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@functools.partial(jax.jit, static_argnames=("impl", "kw"))
def _value_and_grads(q, k, v, cot, arrays, *, impl, kw):
    def f(q, k, v, bias):
        return sl.dot_product_attention(
            q, k, v, bias=bias, implementation=impl, **dict(kw), **arrays
        )

    bias = arrays.pop("bias", None)
    out, vjp = jax.vjp(f, q, k, v, bias)
    return out, vjp(cot)


def _both(q, k, v, arrays, **kw):
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))
    kw = tuple(sorted(kw.items()))
    ref = _value_and_grads(q, k, v, cot, dict(arrays), impl="dense", kw=kw)
    got = _value_and_grads(q, k, v, cot, dict(arrays), impl="cudnn", kw=kw)
    return ref, got


def _close(ref, got):
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-6)


CASES = {
    "plain": ({}, {}),
    "causal": ({}, {"is_causal": True}),
    "causal_window": ({}, {"is_causal": True, "local_window_size": (2, 3)}),
    "back_window": ({}, {"local_window_size": (1, 0)}),
    "lengths": (
        {
            "query_seq_lengths": jnp.array([4, 0], jnp.int32),
            "key_value_seq_lengths": jnp.array([3, 6], jnp.int32),
        },
        {"is_causal": True},
    ),
    # query 0 sees key 0 only, and key 0 is past the length: a dead row by structure.
    "structure_dead": (
        {"key_value_seq_lengths": jnp.array([0, 2], jnp.int32)},
        {"local_window_size": (0, 0), "is_causal": True},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_dense_values_and_gradients(stand_in, case):
    arrays, kw = CASES[case]
    ref, got = _both(*_qkv(), arrays, **kw)
    _close(ref, got)


def test_bias_mask_segments_gqa_batch_dims(stand_in):
    q, k, v = _qkv(batch=(2, 1), heads=4, kv_heads=2, kv_len=5)
    rng = np.random.default_rng(2)
    bias = rng.standard_normal((1, 4, 6, 5), np.float32)
    bias[0, 1, 2] = -np.inf  # row 2 of head 1: masked by the bias throughout
    bias[0, 0, 3, 1] = -np.inf
    mask = np.ones((2, 1, 1, 6, 5), bool)
    mask[1, 0, 0, 4] = False  # row 4 of batch 1: masked throughout
    arrays = {
        "bias": jnp.asarray(bias),
        "mask": jnp.asarray(mask),
        "query_segment_ids": jnp.array([0, 0, 0, 1, 1, 2], jnp.int32),
        "key_value_segment_ids": jnp.array([0, 0, 1, 1, 1], jnp.int32),
    }
    ref, got = _both(q, k, v, arrays)
    _close(ref, got)
    out = got[0]
    assert (out[:, :, 2, 1] == 0).all() and (out[1, 0, 4] == 0).all()
    assert (out[..., 5, :, :] == 0).all()  # segment 2 has no key


def test_bias_row_of_minus_inf_is_a_dead_row(stand_in):
    # No mask: jax.nn's softmax would see a row of -inf only (NaN, in the gradients too).
    q, k, v = _qkv()
    bias = np.zeros((2, 1, 6, 6), np.float32)
    bias[1, 0, 3] = -np.inf
    bias[0, 0, :, 2] = -np.inf
    ref, got = _both(q, k, v, {"bias": jnp.asarray(bias)})
    _close(ref, got)
    assert (got[0][1, 3] == 0).all() and (got[1][0][1, 3] == 0).all()


def test_query_dead_by_structure_leaks_no_nan(stand_in):
    # Query 3 of batch 1 sees only key 3, past the length; its NaN must not reach the
    # live keys' gradients through 0 * NaN.
    q, k, v = _qkv()
    q = q.at[1, 3].set(jnp.nan)
    kw = {"local_window_size": (0, 0), "is_causal": True}
    arrays = {"key_value_seq_lengths": jnp.array([6, 2], jnp.int32)}
    _, (out, grads) = _both(q, k, v, arrays, **kw)
    assert (out[1, 2:] == 0).all()
    assert all(np.isfinite(g).all() for g in grads[:3]) and (grads[0][1, 2:] == 0).all()


def test_dead_rows_exactly_zero_and_nan_padding_does_not_leak(stand_in):
    q, k, v = _qkv()
    # batch 0: queries past 4 and keys past 3 are NaN padding; batch 1: no key at all,
    # so every query is dead (and inf), though its length says 6.
    q_lens, kv_lens = jnp.array([4, 6], jnp.int32), jnp.array([3, 0], jnp.int32)
    q = q.at[0, 4:].set(jnp.nan).at[1].set(jnp.inf)
    k = k.at[0, 3:].set(jnp.nan).at[1].set(-jnp.inf)
    v = v.at[0, 3:].set(jnp.nan).at[1].set(jnp.nan)

    def loss(q, k, v):
        out = sl.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            query_seq_lengths=q_lens,
            key_value_seq_lengths=kv_lens,
            implementation="cudnn",
        )
        return jnp.sum(out**2), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    assert (out[0, 4:] == 0).all() and (out[1] == 0).all()
    assert (grads[0][0, 4:] == 0).all() and (grads[0][1] == 0).all()
    for g in grads[1:]:
        assert (g[0, 3:] == 0).all() and (g[1] == 0).all()
    assert (grads[0][0, :4] != 0).any()


def test_return_residual_matches_dense(stand_in):
    q, k, v = _qkv()
    kw = {
        "is_causal": True,
        "key_value_seq_lengths": jnp.array([0, 4], jnp.int32),
        "return_residual": True,
    }
    ref = sl.dot_product_attention(q, k, v, implementation="dense", **kw)
    got = sl.dot_product_attention(q, k, v, implementation="cudnn", **kw)
    _close(ref, got)
    assert (got[1][0] == -jnp.inf).all()


def test_implementation_none_never_takes_cudnn(monkeypatch):
    monkeypatch.setattr(_cudnn, "BACKEND", "not an implementation")
    q, k, v = _qkv()
    out = sl.dot_product_attention(q, k, v, is_causal=True)
    ref = sl.dot_product_attention(q, k, v, is_causal=True, implementation="dense")
    _close(ref, out)


def _einsum(spec, a, b):
    return jnp.einsum(spec, a, b)


UNSUPPORTED = {
    "sink": {"sink": jnp.zeros(2)},
    "dropout": {
        "dropout_rate": 0.1,
        "deterministic": False,
        "dropout_rng": jax.random.key(0),
    },
    "logits_soft_cap": {"logits_soft_cap": 30.0},
    "custom einsums": {"qk_attn_weights_einsum": _einsum, "attn_weights_value_einsum": _einsum},
    "return_logsumexp": {"return_logsumexp": True},
    "precision": {"precision": jax.lax.Precision.HIGHEST},
    "look-ahead": {"local_window_size": (2, 2)},
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_options_raise_naming_the_others(stand_in, name):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="implementation=None, 'dense' or 'chunked'"):
        jax.eval_shape(
            functools.partial(
                sl.dot_product_attention, implementation="cudnn", **UNSUPPORTED[name]
            ),
            q,
            k,
            v,
        )


def test_float32_on_cudnn_raises_at_trace_time():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        jax.eval_shape(
            functools.partial(sl.dot_product_attention, implementation="cudnn"), q, k, v
        )


def test_bfloat16_and_no_keys(stand_in):
    # bfloat16, cuDNN's dtype, agrees with the dense path to bfloat16 rounding; with no
    # keys at all every row is exactly 0 and nothing is called.
    q, k, v = _qkv(batch=())
    kw = {"is_causal": True, "dtype": jnp.bfloat16}
    ref = sl.dot_product_attention(q, k, v, implementation="dense", **kw)
    got = sl.dot_product_attention(q, k, v, implementation="cudnn", **kw)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=0.02, atol=0.02
    )
    out = sl.dot_product_attention(q, k[:0], v[:0], implementation="cudnn")
    assert out.shape == q.shape and (out == 0).all()
