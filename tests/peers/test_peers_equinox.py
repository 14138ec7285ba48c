"""Equinox's attention tests (tests/test_nn.py), re-written for stablelayers.

``stablelayers.equinox.MultiHeadAttention`` stands in for ``equinox.nn.MultiheadAttention``,
and ``stablelayers.dot_product_attention`` (with a heads axis of 1) for Equinox's private
single-head ``dot_product_attention`` and ``dot_product_attention_weights``.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablelayers as sl
import stablelayers.equinox as sleqx


def _one_head(q, k, v, mask=None):
    # Equinox's helpers take (len, dim) and a (q_len, kv_len) mask: add the heads axis.
    out = sl.dot_product_attention(q[:, None], k[:, None], v[:, None], mask=mask)
    return out[:, 0]


def test_attention_weights():
    # origin: equinox tests/test_nn.py test_dot_product_attention_weights (the weights are
    # read back by attending over the identity)
    q = jnp.array([[0.0, 2**0.5]])
    k = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    weights = _one_head(q, k, jnp.eye(2))
    assert weights.shape == (1, 2)
    np.testing.assert_allclose(weights, jnp.array([[1, jnp.e]]) / (1 + jnp.e), rtol=1e-6)
    weights = _one_head(q, k, jnp.eye(2), mask=jnp.array([[True, False]]))
    np.testing.assert_allclose(weights, [[1.0, 0.0]])

    q16 = jnp.array([[1.0]], jnp.float16)
    k16 = jnp.array([[9.0], [1.0]], jnp.float16)
    weights = _one_head(q16, k16, jnp.eye(2, dtype=jnp.float16))
    assert weights.dtype == jnp.float16
    assert weights.max() < 1


def test_attention_values():
    # origin: equinox tests/test_nn.py test_dot_product_attention
    q = jnp.array([[0.0, 2**0.5]])
    k = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    v = jnp.array([[1.0], [0.0]])
    out = _one_head(q, k, v)
    assert out.shape == (1, 1)
    np.testing.assert_allclose(out, [[1 / (1 + jnp.e)]], rtol=1e-6)
    assert _one_head(q, k, v, mask=jnp.array([[True, False]])) == 1.0


def test_multihead_shapes():
    # origin: equinox tests/test_nn.py test_multihead_attention (all sizes different)
    keys = jax.random.split(jax.random.key(0), 4)
    attn = sleqx.MultiHeadAttention(
        num_heads=2,
        query_size=3,
        key_size=5,
        value_size=7,
        output_size=11,
        qk_size=13,
        vo_size=17,
        key=keys[0],
    )
    q = jax.random.uniform(keys[1], (19, 3))
    k = jax.random.uniform(keys[2], (23, 5))
    v = jax.random.uniform(keys[3], (23, 7))
    assert attn(q, k, v).shape == (19, 11)


def _arange_weights(cls):
    attn = cls(num_heads=2, query_size=4, key=jax.random.key(0))
    return eqx.tree_at(
        lambda m: (
            m.query_proj.weight,
            m.key_proj.weight,
            m.value_proj.weight,
            m.output_proj.weight,
        ),
        attn,
        [jnp.arange(16.0).reshape(4, 4) for _ in range(4)],
    )


def test_multihead_exact_values():
    # origin: equinox tests/test_nn.py test_multihead_attention (fixed weights, one token,
    # then a mask per head and one shared mask that leave the first key only)
    attn = _arange_weights(sleqx.MultiHeadAttention)
    expected = jnp.array([[680.0, 1960.0, 3240.0, 4520.0]])
    x = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(attn(x, x, x), expected, rtol=1e-6)
    x = jnp.arange(1, 13, dtype=jnp.float32).reshape(3, 4)
    first_key = jnp.array([True, False, False])
    for mask in (jnp.broadcast_to(first_key, (2, 3, 3)), jnp.broadcast_to(first_key, (3, 3))):
        np.testing.assert_allclose(
            attn(x, x, x, mask), jnp.broadcast_to(expected, (3, 4)), rtol=1e-6
        )


def test_same_key_same_weights_and_outputs():
    # origin: equinox tests/test_nn.py test_multihead_attention (the layer as Equinox's)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    ours = sleqx.MultiHeadAttention(num_heads=2, query_size=8, key=jax.random.key(0))
    theirs = eqx.nn.MultiheadAttention(num_heads=2, query_size=8, key=jax.random.key(0))
    np.testing.assert_array_equal(ours.query_proj.weight, theirs.query_proj.weight)
    np.testing.assert_allclose(ours(x, x, x), theirs(x, x, x), atol=1e-6)


def test_inference_switches_dropout():
    # origin: equinox tests/test_nn.py test_multihead_attention_inference
    keys = jax.random.split(jax.random.key(0), 8)
    attn = sleqx.MultiHeadAttention(num_heads=2, query_size=10, dropout_p=0.5, key=keys[0])
    x = jax.random.normal(keys[1], (3, 10))
    assert (attn(x, x, x, key=keys[2], inference=True) == attn(x, x, x, inference=True)).all()
    assert (attn(x, x, x, key=keys[3]) != attn(x, x, x, key=keys[4])).any()
    frozen = sleqx.MultiHeadAttention(
        num_heads=2, query_size=10, dropout_p=0.5, inference=True, key=keys[5]
    )
    assert (frozen(x, x, x, key=keys[6]) == frozen(x, x, x, key=keys[7])).all()


def test_deterministic_is_deprecated_like_equinox():
    # origin: equinox tests/test_nn.py test_multihead_attention_deterministic (Equinox's
    # deprecated spelling still works, and warns (a UserWarning) as Equinox's does)
    keys = jax.random.split(jax.random.key(0), 3)
    attn = sleqx.MultiHeadAttention(num_heads=2, query_size=10, dropout_p=0.5, key=keys[0])
    x = jax.random.normal(keys[1], (3, 10))
    with pytest.warns(UserWarning, match="deterministic"):
        z1 = attn(x, x, x, key=keys[2], deterministic=True)
    with pytest.warns(UserWarning, match="deterministic"):
        z2 = attn(x, x, x, deterministic=True)
    assert (z1 == z2).all()


def test_vmap_over_batch():
    # origin: equinox tests/test_nn.py (Equinox layers take one sequence; vmap batches)
    attn = sleqx.MultiHeadAttention(num_heads=2, query_size=8, sink=True, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 8))
    batched = jax.vmap(lambda s: attn(s, s, s))(x)
    np.testing.assert_allclose(batched[1], attn(x[1], x[1], x[1]), atol=1e-6)


def test_fully_masked_query_documented_difference():
    # origin: equinox tests/test_nn.py test_multihead_attention (masks); documented
    # difference (docs/semantics.md, "fully masked query"): Equinox gives the mean of the
    # values, stablelayers exactly 0, so the output bias
    x = jax.random.normal(jax.random.key(1), (3, 8))
    kw = dict(num_heads=2, query_size=8, use_output_bias=True, key=jax.random.key(0))
    ours, theirs = sleqx.MultiHeadAttention(**kw), eqx.nn.MultiheadAttention(**kw)
    mask = jnp.ones((3, 3), bool).at[0].set(False)
    out = ours(x, x, x, mask)
    np.testing.assert_allclose(out[0], ours.output_proj.bias, atol=1e-6)
    np.testing.assert_allclose(out[1:], theirs(x, x, x, mask)[1:], atol=1e-5)
