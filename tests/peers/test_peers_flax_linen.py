"""Flax's Linen attention tests (tests/linen/linen_attention_test.py), re-written.

Each case runs twice where that makes sense: Flax's own ``MultiHeadDotProductAttention``
with ``attention_fn=stablelayers.dot_product_attention``, and
``stablelayers.linen.MultiHeadAttention``; ``documented difference`` tests assert
stablelayers' own documented behaviour (docs/semantics.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.nn import initializers

import stablelayers as sl
import stablelayers.linen as sllinen


def _flax_with_fn(**kwargs):
    return nn.MultiHeadDotProductAttention(attention_fn=sl.dot_product_attention, **kwargs)


LAYERS = {"flax+attention_fn": _flax_with_fn, "stablelayers": sllinen.MultiHeadAttention}
ONES = dict(kernel_init=initializers.ones, bias_init=initializers.zeros)


@pytest.fixture(params=sorted(LAYERS))
def layer(request):
    return LAYERS[request.param]


def test_self_attention(layer):
    # origin: flax tests/linen/linen_attention_test.py test_multihead_self_attention
    x = jnp.ones((4, 6, 5))
    module = layer(num_heads=8, qkv_features=16, deterministic=False, **ONES)
    y, _ = module.init_with_output(jax.random.key(0), x)
    assert y.shape == x.shape and y.dtype == jnp.float32


def test_dtype_infer_complex(layer):
    # origin: flax tests/linen/linen_attention_test.py test_dtype_infer. A documented
    # difference (docs/semantics.md): a softmax over complex logits has no order to take a
    # max by, so stablelayers raises where Flax computes in complex64.
    x = jnp.ones((4, 6, 5), jnp.complex64)
    module = layer(num_heads=8, qkv_features=16, deterministic=False, **ONES)
    with pytest.raises(TypeError, match="must be real"):
        module.init_with_output(jax.random.key(0), x)


def test_encoder_decoder_two_batch_dims(layer):
    # origin: flax tests/linen/linen_attention_test.py test_multihead_encoder_decoder_attention
    q = jnp.ones((4, 2, 3, 5))
    module = layer(num_heads=8, qkv_features=16, deterministic=False, **ONES)
    y, _ = module.init_with_output(jax.random.key(0), q)
    assert y.shape == q.shape


def test_dropout_at_init(layer):
    # origin: flax tests/linen/linen_attention_test.py test_multihead_self_attention_w_dropout
    x = jnp.ones((4, 2, 3, 5))
    module = layer(num_heads=8, qkv_features=16, dropout_rate=0.1, deterministic=False, **ONES)
    k1, k2 = jax.random.split(jax.random.key(0))
    y, _ = module.init_with_output({"params": k1, "dropout": k2}, x)
    assert y.shape == x.shape


def test_explicit_dropout_rng(layer):
    # origin: flax tests/linen/linen_attention_test.py
    # test_multihead_self_attention_explicit_dropout
    kwargs = dict(num_heads=8, qkv_features=16, dropout_rate=0.5, deterministic=False)

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x, dropout_rng=None):
            first = layer(**kwargs, **ONES)(x, x, dropout_rng=dropout_rng)
            second = layer(**kwargs, **ONES)(x, x, dropout_rng=dropout_rng)
            return first, second

    r1, r2, r3, r4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(r1, (2, 3, 5))
    module = Two()
    variables = module.init({"params": r1, "dropout": r2}, x)
    a, b = module.apply(variables, x, rngs={"params": r1, "dropout": r2})
    c, d = module.apply(variables, x, rngs={"dropout": r2})
    e, _ = module.apply(variables, x, rngs={"dropout": r3})
    assert not (a == b).all()  # two layers draw two patterns
    assert (a == c).all() and (b == d).all()  # same rng, same pattern
    assert not (a == e).all()
    a, b = module.apply(variables, x, dropout_rng=r4)  # one explicit key for both
    assert (a == b).all() and a.shape == x.shape


def test_dropout_disabled_is_deterministic(layer):
    # origin: flax tests/linen/linen_attention_test.py
    # test_multihead_self_attention_w_dropout_disabled
    x = jax.random.normal(jax.random.key(1), (2, 3, 5))
    r = jax.random.split(jax.random.key(0), 4)
    module = layer(num_heads=8, qkv_features=16, dropout_rate=0.0, deterministic=True, **ONES)
    y1, variables = module.init_with_output({"params": r[0], "dropout": r[1]}, x)
    y2, _ = module.init_with_output({"params": r[2], "dropout": r[3]}, x)
    np.testing.assert_allclose(y1, y2)
    halfway = layer(num_heads=8, qkv_features=16, dropout_rate=0.5, **ONES)
    y3 = halfway.apply(variables, x, deterministic=True, rngs={"dropout": r[1]})
    y4 = halfway.apply(variables, x, deterministic=True, rngs={"dropout": r[3]})
    np.testing.assert_allclose(y3, y4)


def test_decoding_matches_causal(layer):
    # origin: flax tests/linen/linen_attention_test.py test_decoding (1-d case; a Python
    # loop over positions in place of flax.jax_utils.scan_in_dim)
    bs, length, heads, features = 2, 5, 3, 4
    k1, k2 = jax.random.split(jax.random.key(0))
    inputs = jax.random.normal(k1, (bs, length, heads * features))
    module = layer(
        num_heads=heads,
        qkv_features=heads * features,
        precision=jax.lax.Precision.HIGHEST,
        deterministic=False,
        decode=False,
    )
    decoder = module.clone(decode=True)
    variables = decoder.init(k2, inputs)
    params, cache = variables["params"], variables["cache"]
    causal = nn.make_causal_mask(jnp.ones((bs, length)))
    expected = module.apply({"params": params}, inputs, mask=causal)
    steps = []
    for i in range(length):
        y, updates = decoder.apply(
            {"params": params, "cache": cache}, inputs[:, i : i + 1], mutable=["cache"]
        )
        cache = updates["cache"]
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), expected, atol=1e-5)


def test_autoregressive_receptive_field(layer):
    # origin: flax tests/linen/linen_attention_test.py test_autoregresive_receptive_field_1d
    length = 6
    k1, k2 = jax.random.split(jax.random.key(0))
    inputs = jax.random.normal(k2, (1, length, 1))
    module = layer(num_heads=1, kernel_init=initializers.ones, deterministic=False)
    variables = module.init(k1, inputs)
    causal = nn.make_causal_mask(jnp.ones((1, length)))

    @jax.jit
    def grad_at(pos):
        def loss(x):
            return module.apply(variables, x, mask=causal)[0, pos].sum()

        return jax.grad(loss)(inputs)[0, :, 0]

    for i in range(length):
        deps = np.abs(np.asarray(grad_at(i))) > 1e-5
        assert deps[: i + 1].all() or i == 0 or deps[:i].all()
        assert not deps[i + 1 :].any()


def test_kv_arguments(layer):
    # origin: flax tests/linen/linen_attention_test.py test_multihead_kv_args
    k1, k2 = jax.random.split(jax.random.key(0))
    query = jax.random.uniform(k1, (3, 5))
    kv = jax.random.uniform(k1, (9, 5))
    module = layer(num_heads=8, qkv_features=16, deterministic=False, **ONES)
    y0, v0 = module.init_with_output(k2, query, inputs_k=kv, inputs_v=kv)
    y1, v1 = module.init_with_output(k2, query, inputs_k=kv)
    assert (y0 == y1).all()
    assert jax.tree.all(jax.tree.map(lambda a, b: (a == b).all(), v0, v1))
    with pytest.raises(ValueError, match="`inputs_k` cannot be None"):
        module.init_with_output(k2, query, inputs_v=kv)


def _sow_model(make):
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, sow_weights=False):
            kw = dict(num_heads=8, qkv_features=16, deterministic=False, **ONES)
            x = make(**kw)(x, sow_weights=sow_weights)
            x = make(**kw)(x)
            return make(**kw)(x, sow_weights=sow_weights)

    return Model()


def _check_sown(model, prefix):
    x = jnp.ones((4, 6, 5))
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, mutable=["intermediates"], sow_weights=True)
    sown = state["intermediates"]
    assert sown[f"{prefix}_0"]["attention_weights"][0].shape == (4, 8, 6, 6)
    assert f"{prefix}_1" not in sown
    assert sown[f"{prefix}_2"]["attention_weights"][0].shape == (4, 8, 6, 6)
    _, state = model.apply(variables, x, mutable=["intermediates"], sow_weights=False)
    assert "intermediates" not in state


def test_sow_weights_flax_class():
    # origin: flax tests/linen/linen_attention_test.py test_multihead_sow_attention_weights
    _check_sown(_sow_model(_flax_with_fn), "MultiHeadDotProductAttention")


def test_sow_weights_stablelayers_class_flax_names():
    # origin: flax tests/linen/linen_attention_test.py test_multihead_sow_attention_weights
    # (Flax's test uses nn.MultiHeadAttention, auto-named MultiHeadAttention_N)
    _check_sown(_sow_model(nn.MultiHeadAttention), "MultiHeadAttention")
    _check_sown(_sow_model(sllinen.MultiHeadAttention), "MultiHeadAttention")
    other = "MultiHeadDotProductAttention"
    _check_sown(_sow_model(getattr(sllinen, other)), other)


def test_decode_with_x64(layer):
    # origin: flax tests/linen/linen_attention_test.py test_autoregressive_decode_with_x64
    with jax.enable_x64(True):
        x = jnp.ones((1, 4, 4))
        module = layer(num_heads=2, qkv_features=4, decode=True)
        variables = module.init(jax.random.key(0), x)  # (x, x, x) trips a Flax warning
        params, cache = variables["params"], variables["cache"]
        y1, updates = module.apply(
            {"params": params, "cache": cache}, x[:, :1], mutable=["cache"]
        )
        y2, _ = module.apply(
            {"params": params, "cache": updates["cache"]}, x[:, 1:2], mutable=["cache"]
        )
        assert y1.shape == y2.shape == (1, 1, 4)


def test_alias_equivalence():
    # origin: flax tests/linen/linen_attention_test.py test_attention_alias_equivalence:
    # the same key gives Flax's params, and outputs agree
    k1, k2 = jax.random.split(jax.random.key(0))
    query = jax.random.uniform(k1, (3, 5))
    kv = jax.random.uniform(k1, (9, 5))
    kw = dict(
        num_heads=8,
        qkv_features=16,
        kernel_init=initializers.lecun_normal(),
        bias_init=initializers.uniform(),
        deterministic=False,
    )
    out1, v1 = nn.MultiHeadDotProductAttention(**kw).init_with_output(k2, query, kv)
    out2, v2 = sllinen.MultiHeadAttention(**kw).init_with_output(k2, query, kv, kv)
    np.testing.assert_allclose(out1, out2, atol=1e-6)
    assert jax.tree.all(jax.tree.map(lambda a, b: (a == b).all(), v1, v2))


def _parent(make, **name):
    class Parent(nn.Module):
        @nn.compact
        def __call__(self, q, kv):
            return make(num_heads=8, qkv_features=16, deterministic=False, **name)(q, kv, kv)

    return Parent()


def test_alias_submodule_explicit_name():
    # origin: flax tests/linen/linen_attention_test.py test_attention_alias_submodule
    # (MultiHeadAttention named 'MultiHeadDotProductAttention_0' matches the other class)
    k1, k2 = jax.random.split(jax.random.key(0))
    q, kv = jax.random.uniform(k1, (3, 5)), jax.random.uniform(k2, (9, 5))
    out1, v1 = _parent(sllinen.MultiHeadDotProductAttention).init_with_output(k2, q, kv)
    ours = _parent(sllinen.MultiHeadAttention, name="MultiHeadDotProductAttention_0")
    out2, v2 = ours.init_with_output(k2, q, kv)
    assert (out1 == out2).all()
    assert jax.tree.all(jax.tree.map(lambda a, b: (a == b).all(), v1, v2))


@pytest.mark.parametrize("name", ["MultiHeadAttention", "MultiHeadDotProductAttention"])
def test_alias_submodule_auto_name(name):
    # origin: flax tests/linen/linen_attention_test.py test_attention_alias_submodule:
    # each class auto-named as Flax's class of the same name, so Flax's checkpoints load
    # and the same parameters give Flax's outputs
    k1, k2 = jax.random.split(jax.random.key(0))
    q, kv = jax.random.uniform(k1, (3, 5)), jax.random.uniform(k2, (9, 5))
    flax_class, our_class = getattr(nn, name), getattr(sllinen, name)
    out1, v1 = _parent(flax_class).init_with_output(k2, q, kv)
    v2 = _parent(our_class).init(k2, q, kv)
    assert set(v1["params"]) == set(v2["params"]) == {f"{name}_0"}
    assert jax.tree.all(jax.tree.map(lambda a, b: (a == b).all(), v1, v2))
    out2 = _parent(our_class).apply(v1, q, kv, rngs={"dropout": k1})
    out1 = _parent(flax_class).apply(v1, q, kv, rngs={"dropout": k1})
    np.testing.assert_allclose(out1, out2, atol=1e-6)


def _fp32_sown(make):
    x = jax.random.normal(jax.random.key(0), (2, 4, 8), jnp.bfloat16)
    module = make(num_heads=2, dtype=jnp.bfloat16, force_fp32_for_softmax=True)
    variables = module.init(jax.random.key(1), x)
    _, state = module.apply(variables, x, sow_weights=True, mutable=["intermediates"])
    return state["intermediates"]["attention_weights"][0]


def test_force_fp32_for_softmax_flax_reference():
    # origin: flax tests/linen (force_fp32_for_softmax of MultiHeadDotProductAttention): with
    # Flax's own attention the sown weights are float32
    assert _fp32_sown(nn.MultiHeadDotProductAttention).dtype == jnp.float32


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_flax_with_fn, id="flax+attention_fn"),
        pytest.param(sllinen.MultiHeadAttention, id="stablelayers"),
    ],
)
def test_force_fp32_for_softmax(make):
    # origin: flax tests/linen (force_fp32_for_softmax); the softmax itself is float32 in
    # stablelayers either way, but the weights a model sows must be float32 as in Flax
    assert _fp32_sown(make).dtype == jnp.float32


def test_einsum_dot_general_keyword():
    # origin: flax tests/linen (flax.linen.dot_product_attention's einsum_dot_general)
    q = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))
    calls = []

    def dot_general(*args, **kwargs):
        calls.append(1)
        return jax.lax.dot_general(*args, **kwargs)

    expected = nn.dot_product_attention(q, q, q, einsum_dot_general=dot_general)
    out = sl.dot_product_attention(q, q, q, einsum_dot_general=dot_general)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert len(calls) == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(local_window_size=(1, 0)),
        dict(chunk_size=2),
        dict(implementation="dense"),
        dict(query_seq_lengths=jnp.array([2]), key_value_seq_lengths=jnp.array([3])),
    ],
    ids=["window", "chunk_size", "implementation", "lengths"],
)
def test_linen_dot_product_attention_keywords(kwargs):
    # origin: flax tests/linen (attention_fn keywords); the NNX DotProductAttention
    # forwards these, the Linen one must too
    q = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
    module = sllinen.DotProductAttention(num_heads=2, sink=True)
    out, _ = module.init_with_output(jax.random.key(1), q, q, q, **kwargs)
    expected = sl.dot_product_attention(q, q, q, sink=jnp.zeros(2), **kwargs)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_fully_masked_query_gives_output_bias(layer):
    # origin: flax tests/linen/linen_attention_test.py (masked attention); documented
    # difference (docs/semantics.md, "fully masked query"): Flax gives the mean of the
    # values, stablelayers exactly 0 before the output projection, so the output bias
    x = jax.random.normal(jax.random.key(2), (1, 4, 8))
    mask = jnp.zeros((1, 1, 4, 4), bool).at[..., :2, :].set(True)
    module = layer(num_heads=2, bias_init=initializers.normal(1.0))
    variables = module.init(jax.random.key(0), x)
    out = module.apply(variables, x, mask=mask)
    bias = variables["params"]["out"]["bias"]
    np.testing.assert_allclose(out[0, 2:], jnp.broadcast_to(bias, (2, 8)), atol=1e-6)
    flax_out = nn.MultiHeadDotProductAttention(num_heads=2).apply(variables, x, mask=mask)
    np.testing.assert_allclose(out[0, :2], flax_out[0, :2], atol=1e-5)
    assert not np.allclose(flax_out[0, 2:], out[0, 2:])
