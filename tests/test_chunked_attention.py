"""The chunked (online-softmax, recomputing) path of stablelayers.dot_product_attention
against the dense path: every mask kind, sinks, dtypes, lengths that are not a multiple of
the chunk, empty rows; values, logsumexps and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import stablelayers as sl

BATCH, Q_LEN, KV_LEN, HEADS, DIM = 2, 13, 11, 4, 8
# Small odd blocks, so that every case has several blocks and a ragged last one.
CHUNK = (4, 3)
STATIC = (
    "is_causal", "local_window_size", "implementation", "chunk_size", "dtype",
    "return_logsumexp",
)  # fmt: skip


@functools.partial(jax.jit, static_argnames=STATIC)
def _attend(
    query, key, value, bias=None, mask=None, sink=None, q_lens=None, kv_lens=None, **kwargs
):
    return sl.dot_product_attention(
        query, key, value, bias, mask, sink=sink, query_seq_lengths=q_lens,
        key_value_seq_lengths=kv_lens, return_logsumexp=True, **kwargs,
    )  # fmt: skip


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _case(name, kv_heads=2, dtype=jnp.float32):
    q = _normal((BATCH, Q_LEN, HEADS, DIM), 0).astype(dtype)
    k = _normal((BATCH, KV_LEN, kv_heads, DIM), 1).astype(dtype)
    v = _normal((BATCH, KV_LEN, kv_heads, 5), 2).astype(dtype)
    mask_np = np.random.default_rng(3).random((BATCH, HEADS, Q_LEN, KV_LEN)) < 0.5
    mask_np[0, 1, 2] = False  # a fully masked row
    mask_np[1, :, 7] = False  # one in every head
    args = {}
    kwargs = {}
    if "causal" in name:
        kwargs["is_causal"] = True
    if "window" in name:
        # A look-back of 4 keys, itself included; no bound ahead.
        kwargs["local_window_size"] = (3, KV_LEN)
    if "mask" in name:
        args["mask"] = jnp.asarray(mask_np)
    if "bias" in name:
        args["bias"] = _normal((BATCH, HEADS, Q_LEN, KV_LEN), 4)
    if "rowbias" in name:  # broadcast over batch and queries
        args["bias"] = _normal((HEADS, 1, KV_LEN), 5)
    if "sink" in name:
        args["sink"] = _normal((HEADS,), 6)
    if "lengths" in name:
        args["q_lens"] = jnp.asarray([Q_LEN, 6])
        args["kv_lens"] = jnp.asarray([5, 0])  # batch entry 1 attends nothing
    return (q, k, v), args, kwargs


CASES = [
    "plain",
    "causal_mask",
    "bias",
    "rowbias_mask",
    "mask_sink",
    "lengths",
    "causal_lengths_sink",
    "causal_window",
    "window_mask_bias",
]


@functools.partial(jax.jit, static_argnames=("kwargs", "implementation"))
def _values_and_grads(qkv, args, kwargs, implementation):
    """``(out, lse)`` and the gradients of a random linear function of them with respect to
    ``(query, key, value)`` and the bias and sink where given."""
    kwargs = dict(kwargs)
    cotangent = _normal((BATCH, Q_LEN, HEADS, 5), 7)
    lse_cotangent = _normal((BATCH, HEADS, Q_LEN), 8)
    diff = {name: args[name] for name in ("bias", "sink") if name in args}
    rest = {name: a for name, a in args.items() if name not in diff}

    def loss(qkv, diff):
        out, lse = sl.dot_product_attention(
            *qkv, diff.get("bias"), rest.get("mask"), sink=diff.get("sink"),
            query_seq_lengths=rest.get("q_lens"), key_value_seq_lengths=rest.get("kv_lens"),
            implementation=implementation, chunk_size=CHUNK, return_logsumexp=True, **kwargs,
        )  # fmt: skip
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        value = jnp.sum(out.astype(jnp.float32) * cotangent) + jnp.sum(
            finite_lse * lse_cotangent
        )
        return value, (out, lse)

    (_, values), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(qkv, diff)
    return values, grads


@pytest.mark.parametrize("name", CASES)
def test_chunked_matches_dense(name):
    qkv, args, kwargs = _case(name)
    kwargs = tuple(sorted(kwargs.items()))
    (out, lse), grads = _values_and_grads(qkv, args, kwargs, "chunked")
    (dense_out, dense_lse), dense_grads = _values_and_grads(qkv, args, kwargs, "dense")
    np.testing.assert_allclose(out, dense_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(dense_lse))
    np.testing.assert_allclose(lse, dense_lse, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads), strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_empty_rows_are_exactly_zero_with_exactly_zero_gradients():
    qkv, args, _ = _case("lengths_mask_bias")
    # NaN and inf logits in masked places must not leak.
    args["bias"] = jnp.where(args["mask"], args["bias"], jnp.nan).at[0, 0, 0, 0].set(-jnp.inf)
    out, lse = _attend(*qkv, **args, implementation="chunked", chunk_size=CHUNK)
    key_kept = np.asarray(args["mask"]) & (
        np.arange(KV_LEN) < np.asarray([5, 0])[:, None, None, None]
    )
    empty = ~key_kept.any(-1)  # (batch, heads, q): batch entry 1 has key length 0
    assert empty[0].any() and empty[1].all()
    assert np.isfinite(out).all()
    out_rows = np.moveaxis(np.asarray(out), -2, -3)  # (batch, heads, q, dim)
    assert (out_rows[empty] == 0).all()
    assert np.isneginf(np.asarray(lse)[empty]).all()

    def loss(q, k, v, bias):
        out, _ = _attend(
            q, k, v, bias, args["mask"], q_lens=args["q_lens"], kv_lens=args["kv_lens"],
            implementation="chunked", chunk_size=CHUNK,
        )  # fmt: skip
        return jnp.sum(out)

    d_q, d_k, d_v, d_bias = jax.grad(loss, argnums=(0, 1, 2, 3))(*qkv, args["bias"])
    assert all(np.isfinite(g).all() for g in (d_q, d_k, d_v, d_bias))
    d_q_rows = np.moveaxis(np.asarray(d_q), -2, -3)
    assert (d_q_rows[empty] == 0).all()
    assert (np.asarray(d_k)[1] == 0).all() and (np.asarray(d_v)[1] == 0).all()
    assert (np.asarray(d_bias)[~np.asarray(args["mask"])] == 0).all()


def test_multi_head_attention_and_many_batch_dims():
    q = _normal((2, 3, Q_LEN, HEADS, DIM), 0)
    k = _normal((2, 3, KV_LEN, HEADS, DIM), 1)
    v = _normal((2, 3, KV_LEN, HEADS, DIM), 2)
    mask = jnp.asarray(np.random.default_rng(0).random((2, 1, 1, Q_LEN, KV_LEN)) < 0.7)
    sink = _normal((3, HEADS), 3)
    dense, _ = _attend(q, k, v, mask=mask, sink=sink, implementation="dense")
    out, _ = _attend(q, k, v, mask=mask, sink=sink, implementation="chunked", chunk_size=5)
    np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision(dtype):
    qkv, args, kwargs = _case("causal_mask_sink", dtype=dtype)
    kwargs = tuple(sorted(kwargs.items()))
    (out, lse), grads = _values_and_grads(qkv, args, kwargs, "chunked")
    (dense, dense_lse), dense_grads = _values_and_grads(qkv, args, kwargs, "dense")
    assert out.dtype == dtype and lse.dtype == jnp.float32
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(out.astype(np.float32), dense.astype(np.float32), atol=tol)
    np.testing.assert_allclose(lse, dense_lse, atol=tol)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(want, np.float32),
            atol=5 * tol,
            rtol=5 * tol,
        )


def test_gradients_match_finite_differences(x64):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s)) for s in ((1, 7, 2, 4), (1, 6, 1, 4),
                                                          (1, 6, 1, 3)))  # fmt: skip
    bias = jnp.asarray(rng.standard_normal((2, 7, 6)))
    sink = jnp.asarray(rng.standard_normal((2,)))
    mask = jnp.asarray(rng.random((7, 6)) < 0.7).at[3].set(False)

    def f(q, k, v, bias, sink):
        return sl.dot_product_attention(
            q, k, v, bias, mask, sink=sink, is_causal=True, implementation="chunked",
            chunk_size=(2, 4), return_logsumexp=True,
        )  # fmt: skip

    check_grads(f, (q, k, v, bias, sink), order=1, modes=("rev",))


def test_dropout():
    q = jnp.tile(_normal((1, 40, 1, DIM), 0), (2, 1, 2, 1))  # identical batch entries, heads
    k = jnp.tile(_normal((1, 37, 1, DIM), 1), (2, 1, 2, 1))
    v = jnp.tile(_normal((1, 37, 1, DIM), 2), (2, 1, 2, 1))

    @functools.partial(jax.jit, static_argnames=("deterministic", "broadcast_dropout"))
    def attend(q, k, v, seed, rate=0.5, deterministic=False, broadcast_dropout=True):
        return sl.dot_product_attention(
            q, k, v, dropout_rng=jax.random.key(seed, impl="rbg"), dropout_rate=rate,
            deterministic=deterministic, broadcast_dropout=broadcast_dropout,
            implementation="chunked", chunk_size=(8, 16),
        )  # fmt: skip

    plain = sl.dot_product_attention(q, k, v, implementation="dense")
    # deterministic=True is no dropout at all.
    np.testing.assert_allclose(attend(q, k, v, 0, deterministic=True), plain, atol=1e-6)
    out = attend(q, k, v, 0)
    assert np.isfinite(out).all() and not np.allclose(out, plain)
    # broadcast_dropout: one pattern for every batch entry and head.
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
    unshared = attend(q, k, v, 0, broadcast_dropout=False)
    assert not np.allclose(unshared[0], unshared[1])
    # Kept weights are scaled by 1 / keep_prob: the mean over many draws is the plain output.
    outs = jax.vmap(lambda seed: attend(q[:1], k[:1], v[:1], seed, 0.3))(jnp.arange(64))
    np.testing.assert_allclose(outs.mean(0), plain[:1], atol=0.1)

    # The backward pass recomputes the forward pass's pattern: the gradients match finite
    # differences of the dropped-out function.
    check_grads(lambda q, k, v: attend(q, k, v, 1), (q[:1, :20], k[:1, :20], v[:1, :20]),
                order=1, modes=("rev",), atol=3e-2, rtol=3e-2, eps=1e-2)  # fmt: skip


def test_automatic_choice_and_errors():
    q = _normal((1, 1024, 1, 8), 0)
    k = _normal((1, 1024, 1, 8), 1)
    lowered = jax.jit(lambda q, k: sl.dot_product_attention(q, k, k, is_causal=True)).lower(
        q, k
    )
    assert "while" in lowered.as_text()  # the chunked loops
    lowered = jax.jit(lambda q, k: sl.dot_product_attention(q[:, :64], k, k)).lower(q, k)
    assert "while" not in lowered.as_text()
    with pytest.raises(ValueError, match="implementation"):
        sl.dot_product_attention(q, k, k, implementation="flash")
    with pytest.raises(ValueError, match="sow"):
        sl.dot_product_attention(q, k, k, implementation="chunked", module=object())
    with pytest.raises(TypeError, match="query_seq_lengths"):
        sl.dot_product_attention(q, k, k, query_seq_lengths=jnp.ones(1))
    # forward_mode() needs jvp rules, which only the dense path has.
    with sl.forward_mode():
        lowered = jax.jit(lambda q, k: sl.dot_product_attention(q, k, k)).lower(q, k)
        assert "while" not in lowered.as_text()
        with pytest.raises(ValueError, match="forward_mode"):
            sl.dot_product_attention(q, k, k, implementation="chunked")


def test_vmap_of_chunked_matches_batched():
    qkv, args, _ = _case("mask_sink")

    def attend(q, k, v, mask):
        return sl.dot_product_attention(
            q, k, v, mask=mask, sink=args["sink"], implementation="chunked", chunk_size=CHUNK
        )

    def loss(fn, q):
        return jnp.sum(fn(q, *qkv[1:], args["mask"]) ** 2)

    mapped = jax.jit(jax.value_and_grad(lambda q: loss(jax.vmap(attend), q)))(qkv[0])
    batched = jax.jit(jax.value_and_grad(lambda q: loss(attend, q)))(qkv[0])
    for got, want in zip(mapped, batched, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_memory_is_linear_in_length():
    length = 4096
    q = jax.ShapeDtypeStruct((1, length, 1, 64), jnp.float32)

    def temp_bytes(implementation):
        def loss(q, k, v):
            out = sl.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )
            return jnp.sum(out)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked, dense = temp_bytes("chunked"), temp_bytes("dense")
    assert dense >= length * length * 4  # at least one float32 L x L array
    assert chunked < dense / 16
    assert chunked < 64 * length * 64 * 4  # a few dozen (length, head_dim) arrays


def test_as_flax_nnx_attention_fn():
    nnx = pytest.importorskip("flax.nnx")
    chunked = functools.partial(
        sl.dot_product_attention, implementation="chunked", chunk_size=8
    )
    layers = [
        nnx.MultiHeadAttention(
            4, 16, attention_fn=fn, decode=False, dropout_rate=0.1, rngs=nnx.Rngs(0)
        )
        for fn in (sl.dot_product_attention, chunked)
    ]
    x = _normal((2, 21, 16), 0)
    mask = nnx.make_causal_mask(jnp.ones((2, 21)))
    want, got = (layer(x, mask=mask, deterministic=True) for layer in layers)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dropped = layers[1](x, mask=mask, deterministic=False, rngs=nnx.Rngs(1))
    assert np.isfinite(dropped).all()


def test_posinf_logits_share_the_mass_as_on_the_dense_path():
    q, k, v = (_normal((1, 8, 2, 4), seed) for seed in (10, 11, 12))
    bias = jnp.zeros((1, 2, 8, 8)).at[0, 0, 3, 5].set(jnp.inf).at[0, 0, 3, 6].set(jnp.inf)

    def attend(q, bias, implementation):
        return sl.dot_product_attention(
            q, k, v, bias, implementation=implementation, chunk_size=(4, 4)
        )

    out = attend(q, bias, "chunked")
    np.testing.assert_allclose(out, attend(q, bias, "dense"), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[0, 3, 0], (v[0, 5, 0] + v[0, 6, 0]) / 2, rtol=1e-6)
    grads = jax.grad(lambda q, b: attend(q, b, "chunked").sum(), argnums=(0, 1))(q, bias)
    assert all(np.isfinite(g).all() for g in grads)
