"""Flax's NNX attention tests (tests/nnx/nn/attention_test.py), re-written.

Each case runs with Flax's ``nnx.MultiHeadAttention(attention_fn=
stablelayers.dot_product_attention)`` and with ``stablelayers.nnx.MultiHeadAttention``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stablelayers as sl
import stablelayers.linen as sllinen
import stablelayers.nnx as slnnx


def _flax_with_fn(*args, **kwargs):
    return nnx.MultiHeadAttention(*args, attention_fn=sl.dot_product_attention, **kwargs)


LAYERS = {"flax+attention_fn": _flax_with_fn, "stablelayers": slnnx.MultiHeadAttention}


@pytest.fixture(params=sorted(LAYERS))
def layer(request):
    return LAYERS[request.param]


def test_basic(layer):
    # origin: flax tests/nnx/nn/attention_test.py TestMultiHeadAttention.test_basic
    module = layer(num_heads=2, in_features=3, qkv_features=6, out_features=6, rngs=nnx.Rngs(0))
    assert module(jnp.ones((1, 7, 3)), decode=False).shape == (1, 7, 6)


def test_sow_attention_weights(layer):
    # origin: flax tests/nnx/nn/attention_test.py test_multihead_sow_attention_weights
    class Model(nnx.Module):
        def __init__(self, rngs):
            kw = dict(
                in_features=8,
                num_heads=8,
                kernel_init=nnx.initializers.ones_init(),
                bias_init=nnx.initializers.zeros_init(),
                deterministic=False,
            )
            self.layers = nnx.List([layer(**kw, rngs=rngs) for _ in range(3)])

        def __call__(self, x, sow_weights=False):
            x = self.layers[0](x, sow_weights=sow_weights)
            x = self.layers[1](x)
            return self.layers[2](x, sow_weights=sow_weights)

    model = Model(nnx.Rngs(0))
    model.set_attributes(decode=False)
    x = jnp.ones((4, 6, 8))
    # flax 0.12 sows inside nnx.capture (sow outside it is deprecated, so a warning here)
    forward = nnx.capture(model, nnx.Intermediate)
    _, sown = forward(x, True)
    assert sown["layers"][0]["attention_weights"].get_value()[0].shape == (4, 8, 6, 6)
    assert 1 not in sown["layers"]
    assert sown["layers"][2]["attention_weights"].get_value()[0].shape == (4, 8, 6, 6)
    _, sown = forward(x)
    assert not sown


def test_decode_with_x64(layer):
    # origin: flax tests/nnx/nn/attention_test.py test_autoregressive_decode_with_x64
    with jax.enable_x64(True):
        x = jnp.ones((1, 4, 4))
        module = layer(
            in_features=4, num_heads=2, qkv_features=4, decode=True, rngs=nnx.Rngs(0)
        )
        module.init_cache(x.shape, dtype=x.dtype)
        assert module.cached_key[...].shape == (1, 4, 2, 2)
        assert module.cached_value[...].shape == (1, 4, 2, 2)
        y1 = module(x[:, :1])
        y2 = module(x[:, 1:2])
        assert y1.shape == y2.shape == (1, 1, 4)


def test_decode_matches_causal(layer):
    # origin: flax tests/nnx/nn/attention_test.py (decode) with the Linen test_decoding
    # check: step-by-step decoding with the cache equals causal attention over the whole
    length = 5
    x = jax.random.normal(jax.random.key(0), (2, length, 6))
    module = layer(num_heads=2, in_features=6, decode=False, rngs=nnx.Rngs(0))
    causal = nnx.make_causal_mask(jnp.ones((2, length)))
    expected = module(x, mask=causal)
    module.set_attributes(decode=True)
    module.init_cache(x.shape)
    steps = jnp.concatenate([module(x[:, i : i + 1]) for i in range(length)], axis=1)
    np.testing.assert_allclose(steps, expected, atol=1e-5)


@pytest.mark.parametrize("keep_rngs", [True, False])
def test_keep_rngs(layer, keep_rngs):
    # origin: flax tests/nnx/nn/attention_test.py test_keep_rngs
    module = layer(
        in_features=4,
        num_heads=2,
        qkv_features=4,
        decode=True,
        dropout_rate=0.5,
        keep_rngs=keep_rngs,
        rngs=nnx.Rngs(42),
    )
    assert (module.rngs is not None) == keep_rngs
    if keep_rngs:
        _, _, rest = nnx.split(module, nnx.Param, ...)
        assert rest["rngs"]["count"].type is nnx.RngCount
        assert rest["rngs"]["key"].type is nnx.RngKey
    else:
        nnx.split(module, nnx.Param)


@pytest.mark.parametrize(
    "use_bias,dtype,decode,normalize_qk",
    [
        (True, jnp.float32, False, False),
        (False, jnp.float32, True, True),
        (True, jnp.float16, True, False),
    ],
)
def test_linen_consistency(use_bias, dtype, decode, normalize_qk):
    # origin: flax tests/nnx/nn/attention_test.py
    # TestLinenConsistency.test_nnx_attention_equivalence, between the two stablelayers
    # classes (Linen's params copied into the NNX layer)
    kw = dict(
        num_heads=2,
        qkv_features=6,
        out_features=6,
        use_bias=use_bias,
        dtype=dtype,
        precision=jax.lax.Precision.HIGHEST,
        decode=decode,
        normalize_qk=normalize_qk,
    )
    x = jnp.ones((1, 3))
    ours_nnx = slnnx.MultiHeadAttention(in_features=3, rngs=nnx.Rngs(42), **kw)
    ours_linen = sllinen.MultiHeadAttention(**kw)
    variables = ours_linen.init(jax.random.key(42), x)
    for name in ("query", "key", "value", "out"):
        getattr(ours_nnx, name).kernel[...] = variables["params"][name]["kernel"]
        if use_bias:
            getattr(ours_nnx, name).bias[...] = variables["params"][name]["bias"]
    if normalize_qk:
        for name in ("query_ln", "key_ln"):
            getattr(ours_nnx, name).scale[...] = variables["params"][name]["scale"]
    if decode:
        ours_nnx.init_cache(x.shape, dtype=dtype)
    out_linen, _ = ours_linen.apply(variables, x, mutable=["cache"])
    np.testing.assert_array_equal(ours_nnx(x), out_linen)


def test_flax_state_loads(layer):
    # origin: flax tests/nnx/nn/attention_test.py (TestLinenConsistency's weight copy): a
    # Flax layer's state moves into the stablelayers one and gives Flax's output
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    flax_layer = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0)
    )
    ours = layer(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(flax_layer, nnx.Param))
    np.testing.assert_allclose(ours(x), flax_layer(x), atol=1e-6)


def test_is_causal_call(layer):
    # origin: flax tests/nnx/nn/attention_test.py (NNX passes is_causal to attention_fn)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    module = layer(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
    causal = nnx.make_causal_mask(jnp.ones((2, 5)))
    np.testing.assert_allclose(module(x, is_causal=True), module(x, mask=causal), atol=1e-6)


def test_dropout(layer):
    # origin: flax tests/linen/linen_attention_test.py
    # test_multihead_self_attention_w_dropout, in NNX: dropout draws from the layer's rngs
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    module = layer(
        num_heads=2, in_features=8, decode=False, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1)
    )
    a, b = module(x, deterministic=False), module(x, deterministic=False)
    assert not (a == b).all()
    np.testing.assert_array_equal(module(x, deterministic=True), module(x, deterministic=True))


def test_nested_param_paths(layer):
    # origin: flax tests/nnx/nn/attention_test.py (nesting in a parent module): the
    # attribute path and the parameter names are Flax's
    class Parent(nnx.Module):
        def __init__(self, rngs):
            self.attn = layer(num_heads=2, in_features=8, decode=False, rngs=rngs)

    ours = nnx.state(Parent(nnx.Rngs(0)), nnx.Param)
    flax_class = nnx.MultiHeadAttention

    class FlaxParent(nnx.Module):
        def __init__(self, rngs):
            self.attn = flax_class(num_heads=2, in_features=8, decode=False, rngs=rngs)

    reference = nnx.state(FlaxParent(nnx.Rngs(0)), nnx.Param)
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
