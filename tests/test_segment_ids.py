"""Segment ids (packed sequences) in dot_product_attention and the attention layers: the
same values and gradients as the block-diagonal boolean mask they stand for, on the dense
and chunked paths, with every other mask; padding segments give 0 and no gradient; the
chunked path skips the block pairs that share no segment. Ring attention is tested in
test_ring_attention.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import stablelayers as sl
from stablelayers.attention import _chunked_blocks as cb
from stablelayers.attention._arguments import Inputs

B, L, H, KV, D = 2, 40, 4, 2, 8
DOCS = np.array(
    [np.repeat([1, 2, 3, 4], [7, 16, 12, 5]), np.repeat([1, 2, 3, 0], [3, 20, 9, 8])]
)


def _inputs(seed=0, dtype=jnp.float32, q_len=L, kv_len=L):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, q_len, H, D), dtype)
    k = jax.random.normal(ks[1], (B, kv_len, KV, D), dtype)
    v = jax.random.normal(ks[2], (B, kv_len, KV, D), dtype)
    sink = jax.random.normal(ks[3], (H,), dtype)
    return q, k, v, sink


def _block_diagonal(q_ids, kv_ids):
    return (jnp.asarray(q_ids)[:, :, None] == jnp.asarray(kv_ids)[:, None, :])[:, None]


def _value_and_grads(f, q, k, v, sink):
    """The output and the gradients of a weighted sum of it (not the sum itself, whose
    cancellation would magnify float32 rounding)."""
    w = jnp.cos(jnp.arange(q.size, dtype=q.dtype)).reshape(q.shape)
    loss = lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, sink)
    return jax.jit(f)(q, k, v, sink), grads


def _worst(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


OPTIONS = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"is_causal": True, "local_window_size": (5, 0)},
    "two_sided_window": {"local_window_size": (6, 3)},
    "lengths": {
        "query_seq_lengths": jnp.array([L, 33]),
        "key_value_seq_lengths": jnp.array([35, 30]),
    },
    "mask": {"mask": jnp.asarray(np.random.default_rng(0).random((B, 1, L, L)) > 0.2)},
    "soft_cap": {"is_causal": True, "logits_soft_cap": 2.5},
}


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_segment_ids_equal_block_diagonal_mask(implementation, option):
    q, k, v, s = _inputs()
    kw = dict(OPTIONS[option])
    given_mask = kw.pop("mask", None)
    ids = jnp.asarray(DOCS)
    mask = _block_diagonal(ids, ids)
    if given_mask is not None:
        mask = mask & given_mask
    # Sinks on every other case: both kinds of row normaliser are covered.
    with_sink = list(OPTIONS).index(option) % 2 == 1

    def packed(q, k, v, s):
        return sl.dot_product_attention(
            q,
            k,
            v,
            mask=given_mask,
            sink=s if with_sink else None,
            segment_ids=ids,
            implementation=implementation,
            chunk_size=(8, 16),
            **kw,
        )

    def masked(q, k, v, s):
        return sl.dot_product_attention(
            q, k, v, mask=mask, sink=s if with_sink else None, implementation="dense", **kw
        )

    got, want = _value_and_grads(packed, q, k, v, s), _value_and_grads(masked, q, k, v, s)
    assert _worst(got, want) < 1e-5


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_cross_attention_pair_and_unmatched_query_is_zero_without_gradient(implementation):
    # Decoding-style: 12 queries, 40 keys. Query ids 9 match no key: exactly 0 output,
    # exactly 0 gradient, even with NaN in those queries and in keys no query shares.
    q, k, v, _ = _inputs(1, q_len=12)
    q_ids = jnp.array([[1] * 4 + [9] * 4 + [3] * 4, [2] * 6 + [9] * 6])
    kv_ids = jnp.asarray(DOCS)
    dead_q = q_ids == 9
    q = jnp.where(dead_q[:, :, None, None], jnp.nan, q)
    k = k.at[1, -8:].set(jnp.inf)  # entry 1's id 0: no query has it
    kw = dict(query_segment_ids=q_ids, key_value_segment_ids=kv_ids)

    def f(q, k, v):
        return sl.dot_product_attention(
            q, k, v, implementation=implementation, chunk_size=(4, 16), **kw
        )

    out = f(q, k, v)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.asarray(out)[np.asarray(dead_q)] == 0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert np.all(np.asarray(grads[0])[np.asarray(dead_q)] == 0)
    assert np.all(np.asarray(grads[1])[1, -8:] == 0)
    clean_q = jnp.where(dead_q[:, :, None, None], 0.0, q)
    clean_k = k.at[1, -8:].set(0.0)
    ref = sl.dot_product_attention(
        clean_q, clean_k, v, mask=_block_diagonal(q_ids, kv_ids), implementation="dense"
    )
    np.testing.assert_allclose(out, ref, atol=2e-6)


def test_padding_segment_cut_by_lengths_gives_zero_and_no_gradient():
    q, k, v, _ = _inputs(2)
    ids = jnp.asarray(DOCS)  # entry 1 ends in 8 positions of id 0
    kw = dict(segment_ids=ids, key_value_seq_lengths=jnp.array([L, 32]), is_causal=True)
    for implementation in ("dense", "chunked"):
        f = functools.partial(
            sl.dot_product_attention, implementation=implementation, chunk_size=8, **kw
        )
        out = f(q, k, v)
        d_q = jax.grad(lambda q, f=f: jnp.sum(f(q, k, v) ** 2))(q)
        assert np.all(np.asarray(out)[1, 32:] == 0)
        assert np.all(np.asarray(d_q)[1, 32:] == 0)


def test_gradients_match_finite_differences(x64):
    q, k, v, s = (a[:, :16] if a.ndim > 1 else a for a in _inputs(3, jnp.float64))
    ids = jnp.asarray(DOCS[:, :16])
    for implementation in ("dense", "chunked"):
        f = functools.partial(
            sl.dot_product_attention,
            segment_ids=ids,
            is_causal=True,
            implementation=implementation,
            chunk_size=(4, 8),
        )
        check_grads(
            lambda q, k, v, s, f=f: f(q, k, v, sink=s), (q, k, v, s), order=1, modes=["rev"]
        )


def test_jit_vmap_and_hessian_dense():
    q, k, v, _ = _inputs(4)
    ids = jnp.asarray(DOCS)
    f = functools.partial(sl.dot_product_attention, implementation="dense")
    batched = jax.vmap(lambda q, k, v, i: f(q, k, v, segment_ids=i))(q, k, v, ids)
    np.testing.assert_allclose(batched, jax.jit(f)(q, k, v, segment_ids=ids), atol=1e-6)
    small = (q[0, :6, :1], k[0, :6, :1], v[0, :6, :1])
    hess = jax.hessian(lambda q: jnp.sum(f(q, *small[1:], segment_ids=ids[0, :6]) ** 2))(
        small[0]
    )
    ref = jax.hessian(
        lambda q: jnp.sum(
            f(q, *small[1:], mask=_block_diagonal(ids[:1, :6], ids[:1, :6])[0]) ** 2
        )
    )(small[0])
    np.testing.assert_allclose(hess, ref, atol=1e-5)


@st.composite
def packings(draw):
    """A random packing of 2 rows of 48 positions: documents of random lengths, ids
    increasing along each row (the last one may be a padding id 0)."""
    rows = []
    for _ in range(2):
        lengths = []
        while sum(lengths) < 48:
            lengths.append(draw(st.integers(1, 20)))
        lengths[-1] -= sum(lengths) - 48
        ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)
        if draw(st.booleans()):
            ids[ids == ids[-1]] = 0
        rows.append(ids)
    return np.stack(rows).astype(np.int32)


@functools.cache
def _packed_and_masked():
    def packed(q, k, v, s, ids):
        return sl.dot_product_attention(
            q,
            k,
            v,
            sink=s,
            segment_ids=ids,
            is_causal=True,
            implementation="chunked",
            chunk_size=(8, 16),
        )

    def masked(q, k, v, s, ids):
        return sl.dot_product_attention(
            q,
            k,
            v,
            sink=s,
            mask=_block_diagonal(ids, ids),
            is_causal=True,
            implementation="dense",
        )

    def vg(f):
        return jax.jit(
            jax.value_and_grad(
                lambda q, k, v, s, ids: jnp.sum(jnp.sin(f(q, k, v, s, ids))),
                argnums=(0, 1, 2, 3),
            )
        )

    return vg(packed), vg(masked)


@settings(max_examples=15, deadline=None)
@given(packings())
def test_random_packings_equal_block_diagonal_mask(ids):
    ks = jax.random.split(jax.random.key(int(ids.sum())), 4)
    q = jax.random.normal(ks[0], (B, 48, H, D))
    k, v = (jax.random.normal(kk, (B, 48, KV, D)) for kk in ks[1:3])
    s = jax.random.normal(ks[3], (H,))
    packed, masked = _packed_and_masked()
    assert _worst(packed(q, k, v, s, ids), masked(q, k, v, s, ids)) < 1e-5


def test_chunked_skips_block_pairs_of_other_documents():
    # Four documents of 64 in a row of 256, blocks of 32: each query block meets the key
    # blocks of its own document only, so the loops visit 1/4 of the block pairs.
    ids = jnp.repeat(jnp.arange(4), 64)[None]
    cfg = cb.Config(32, 32, 1.0, False, jnp.dtype(jnp.float32), None)
    x = Inputs(
        jnp.zeros((1, 1, 1, 256, 1)),
        jnp.zeros((1, 1, 256, 1)),
        jnp.zeros((1, 1, 256, 1)),
        None,
        None,
        None,
        jnp.array([256]),
        jnp.array([256]),
        q_segments=ids,
        kv_segments=ids,
    )
    table = cb.segment_overlap(cfg, x)
    expected = np.kron(np.eye(4, dtype=bool), np.ones((2, 2), bool))
    np.testing.assert_array_equal(table, expected)
    bounds = [cb.narrow(jnp.int32(0), jnp.int32(8), table[i]) for i in range(8)]
    assert [(int(lo), int(hi)) for lo, hi in bounds] == [
        (2 * (i // 2), 2 * (i // 2) + 2) for i in range(8)
    ]
    # Positions past the lengths do not widen a block's range.
    x = x._replace(kv_lengths=jnp.array([200]), kv_segments=ids.at[0, 200:].set(0))
    assert not bool(cb.segment_overlap(cfg, x)[0, 7])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"segment_ids": DOCS, "query_segment_ids": DOCS, "key_value_segment_ids": DOCS},
            ValueError,
            "not both",
        ),
        ({"query_segment_ids": DOCS}, ValueError, "together"),
        ({"segment_ids": DOCS.astype(np.float32)}, TypeError, "integer"),
        ({"segment_ids": DOCS[:, :5]}, ValueError, "does not broadcast"),
    ],
)
def test_bad_segment_ids_raise_at_trace_time(kwargs, error, match):
    q, k, v, _ = _inputs()
    with pytest.raises(error, match=match):
        jax.eval_shape(functools.partial(sl.dot_product_attention, **kwargs), q, k, v)


def test_self_attention_ids_need_equal_lengths():
    q, k, v, _ = _inputs(q_len=12)
    with pytest.raises(ValueError, match="query_segment_ids"):
        sl.dot_product_attention(q, k, v, segment_ids=DOCS[:, :12])


def test_layers_take_segment_ids():
    nnx = pytest.importorskip("flax.nnx")
    import equinox as eqx  # noqa: F401
    import flax.linen as nn  # noqa: F401

    import stablelayers.equinox as sle
    import stablelayers.linen as sll
    import stablelayers.nnx as sln

    x = jax.random.normal(jax.random.key(0), (B, L, 16))
    ids = jnp.asarray(DOCS)
    mask = _block_diagonal(ids, ids)
    linen = sll.MultiHeadDotProductAttention(4, sink=True)
    params = linen.init(jax.random.key(1), x)
    np.testing.assert_allclose(
        linen.apply(params, x, segment_ids=ids), linen.apply(params, x, mask=mask), atol=1e-6
    )
    layer = sln.MultiHeadAttention(4, 16, sink=True, decode=False, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        nnx.jit(lambda m, x: m(x, segment_ids=ids))(layer, x), layer(x, mask=mask), atol=1e-6
    )
    eqx_layer = sle.MultiheadAttention(4, 16, sink=True, key=jax.random.key(2))
    packed = jax.vmap(lambda x, i: eqx_layer(x, x, x, segment_ids=i, is_causal=True))(x, ids)
    causal = jnp.tril(jnp.ones((L, L), bool))
    masked = jax.vmap(lambda x, m: eqx_layer(x, x, x, m[0] & causal))(x, mask)
    np.testing.assert_allclose(packed, masked, atol=1e-6)


def test_layer_with_an_attention_fn_that_drops_the_ids_raises():
    nnx = pytest.importorskip("flax.nnx")
    import stablelayers.nnx as sln

    layer = sln.MultiHeadAttention(
        4, 16, attention_fn=nnx.dot_product_attention, decode=False, rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="never called"):
        layer(jnp.ones((1, 8, 16)), segment_ids=jnp.ones((1, 8), jnp.int32))
