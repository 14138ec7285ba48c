"""stablelayers.nnx, and dot_product_attention inside flax.nnx.MultiHeadAttention."""

import subprocess
import sys

import pytest

pytest.importorskip("flax")

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.test_util import check_grads

import stablelayers as sl
from stablelayers import nnx as slnnx


def _normal(shape, seed=0, dtype=np.float32):
    # numpy, not jax.random: eager jax.random compiles anew for every shape, which is slow.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _key(seed):
    # rbg keys: the same semantics as the default threefry keys, and several times faster
    # to compile on CPU, where compiling dominates these tests' run time.
    return jax.random.key(seed, impl="rbg")


def _mask(shape, seed=1):
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[..., 0] = True
    return jnp.asarray(mask)


@nnx.jit(static_argnames=("deterministic", "is_causal"))
def _forward(model, x, mask=None, deterministic=None, is_causal=False):
    return model(x, mask=mask, deterministic=deterministic, is_causal=is_causal)


LOGITS = _normal((2, 4, 3, 5))
WHERE = _mask((2, 4, 3, 5))
SINK = jnp.array([0.5, -1.0, 2.0, 0.0])


def _with_sink(layer):
    layer.sink[...] = SINK.astype(layer.sink.dtype)
    return layer


# (layer, call arguments, the functional-core result it must equal)
CASES = {
    "softmax": (
        lambda: slnnx.Softmax(axis=(-2, -1)),
        (LOGITS, WHERE),
        lambda: sl.softmax(LOGITS, axis=(-2, -1), where=WHERE),
    ),
    "log_softmax": (
        lambda: slnnx.LogSoftmax(),
        (LOGITS, WHERE),
        lambda: sl.log_softmax(LOGITS, where=WHERE),
    ),
    "softplus": (
        lambda: slnnx.Softplus(beta=2.0),
        (LOGITS,),
        lambda: sl.softplus(LOGITS, 2.0),
    ),
    "softplus_learnable": (
        lambda: slnnx.Softplus(beta=2.0, learnable=True),
        (LOGITS,),
        lambda: sl.softplus(LOGITS, jnp.exp(jnp.log(jnp.float32(2.0)))),
    ),
    "masked_softmax": (
        lambda: slnnx.MaskedSoftmax(),
        (LOGITS, WHERE),
        lambda: sl.masked_softmax(LOGITS, where=WHERE),
    ),
    "masked_softmax_sink": (
        lambda: _with_sink(slnnx.MaskedSoftmax(num_heads=4, sink=True)),
        (LOGITS, WHERE),
        lambda: sl.masked_softmax(LOGITS, where=WHERE, sink=SINK[:, None]),
    ),
    "masked_softmax_shared_sink": (
        lambda: slnnx.MaskedSoftmax(sink=True),
        (LOGITS, WHERE),
        lambda: sl.masked_softmax(LOGITS, where=WHERE, sink=0.0),
    ),
    "attention_sink": (
        lambda: _with_sink(slnnx.DotProductAttention(num_heads=4, sink=True)),
        (_normal((2, 3, 4, 8), 2), _normal((2, 5, 4, 8), 3), _normal((2, 5, 4, 8), 4)),
        lambda: sl.dot_product_attention(
            _normal((2, 3, 4, 8), 2),
            _normal((2, 5, 4, 8), 3),
            _normal((2, 5, 4, 8), 4),
            sink=SINK,
        ),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_layers_match_the_functional_core_under_jit_vmap_and_grad(name):
    make, args, expected = CASES[name]

    # One jit around everything: compiling dominates the run time of these tests.
    @nnx.jit
    def run(layer, args):
        x, rest = args[0], args[1:]
        out = layer(*args)
        # Map over the leading batch axis; the layer's parameters are shared.
        vmapped = jax.vmap(lambda *a: layer(*(a_[None] for a_ in a))[0])(*args)
        loss = lambda layer, x: jnp.sum(jnp.tanh(layer(x, *rest)))  # noqa: E731
        return out, vmapped, nnx.grad(loss, argnums=(0, 1))(layer, x), expected()

    layer = make()
    out, vmapped, (param_grads, x_grad), expected = run(layer, args)
    # Layer and core compile into different fusions: an attention output near 0 (a sum of
    # terms of size ~1) may differ by a float32 ulp of those terms, 1.2e-7.
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=2.5e-7)
    np.testing.assert_allclose(vmapped, expected, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(x_grad))
    params = jax.tree.leaves(nnx.state(layer, nnx.Param))
    assert len(jax.tree.leaves(param_grads)) == len(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(param_grads))


def test_learnable_beta_and_sink_gradients_match_finite_differences():
    with jax.enable_x64(True):
        x = jnp.linspace(-4.0, 4.0, 9)
        softplus = slnnx.Softplus(beta=1.7, learnable=True, param_dtype=jnp.float64)
        graphdef, state = nnx.split(softplus)
        check_grads(
            jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), (state, x), 1, modes=("rev",)
        )

        logits = LOGITS.astype(jnp.float64)
        where = WHERE.at[0, 1, 2].set(False)  # one empty row
        masked = _with_sink(slnnx.MaskedSoftmax(4, sink=True, param_dtype=jnp.float64))
        graphdef, state = nnx.split(masked)
        apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, where))
        check_grads(apply, (state, logits), 1, modes=("rev",))


def test_state_round_trips_through_split_merge_and_msgpack():
    layer = slnnx.MultiHeadAttention(
        4, 8, sink=True, decode=False, rngs=nnx.Rngs(_key(0)), use_bias=True
    )
    layer.attention_fn.sink[...] = SINK
    x = _normal((2, 3, 8), 5)
    graphdef, state = nnx.split(layer)
    expected = _forward(layer, x)
    np.testing.assert_array_equal(_forward(nnx.merge(graphdef, state), x), expected)

    data = flax.serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
    fresh = slnnx.MultiHeadAttention(4, 8, sink=True, decode=False, rngs=nnx.Rngs(_key(1)))
    state = nnx.state(fresh, nnx.Param)
    nnx.replace_by_pure_dict(state, flax.serialization.msgpack_restore(data))
    nnx.update(fresh, state)
    np.testing.assert_array_equal(_forward(fresh, x), expected)

    softplus = slnnx.Softplus(3.0, learnable=True)
    softplus.log_beta[...] = 0.25
    data = flax.serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(softplus)))
    fresh = slnnx.Softplus(1.0, learnable=True)
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, flax.serialization.msgpack_restore(data))
    nnx.update(fresh, state)
    np.testing.assert_array_equal(fresh(LOGITS), softplus(LOGITS))


# ---------------------------------------------------------------------------------------
# flax.nnx.MultiHeadAttention(attention_fn=stablelayers.dot_product_attention)
# ---------------------------------------------------------------------------------------

BATCH, LENGTH, FEATURES, HEADS = 2, 5, 8, 2


def _flax_mha(attention_fn=None, **kwargs):
    kwargs = {"decode": False, "rngs": nnx.Rngs(_key(0)), **kwargs}
    if attention_fn is not None:
        kwargs["attention_fn"] = attention_fn
    return nnx.MultiHeadAttention(HEADS, FEATURES, **kwargs)


def _padding_mask(valid=(5, 3)):
    """Key padding as in a batch of sequences of the given lengths: query rows of padded
    positions may attend nothing, so they are fully masked."""
    positions = jnp.arange(LENGTH)
    valid = positions[None, :] < jnp.asarray(valid)[:, None]
    return nnx.make_attention_mask(valid, valid)


X = _normal((BATCH, LENGTH, FEATURES), 6)


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_matches_flax_attention_where_no_row_is_empty(num_kv_heads):
    mask = _mask((BATCH, 1, LENGTH, LENGTH))
    ours = _flax_mha(sl.dot_product_attention, num_kv_heads=num_kv_heads)
    theirs = _flax_mha(num_kv_heads=num_kv_heads)
    np.testing.assert_allclose(
        _forward(ours, X, mask=mask), _forward(theirs, X, mask=mask), atol=1e-5
    )


def test_dropout_matches_flax_attention_given_the_same_rngs():
    mask = _mask((BATCH, 1, LENGTH, LENGTH))
    ours = _flax_mha(sl.dot_product_attention, dropout_rate=0.5)
    theirs = _flax_mha(dropout_rate=0.5)
    out = _forward(ours, X, mask=mask, deterministic=False)
    np.testing.assert_allclose(out, _forward(theirs, X, mask=mask, deterministic=False), 1e-5)
    assert not np.allclose(out, _forward(ours, X, mask=mask, deterministic=True))


def test_fully_masked_query_row_is_zero_with_finite_gradients():
    model = _flax_mha(sl.dot_product_attention, use_bias=False, dropout_rate=0.3)
    mask = _padding_mask()

    @nnx.jit
    def run(model, x):
        def loss(model, x, deterministic):
            out = model(x, mask=mask, deterministic=deterministic)
            return jnp.sum(out**2), out

        def row_loss(model, x):
            return jnp.sum(model(x, mask=mask, deterministic=True)[1, 3:])

        grad = nnx.value_and_grad(loss, has_aux=True)
        # Forward and backward with dropout off and on.
        results = [grad(model, x, deterministic) for deterministic in (True, False)]
        return results, nnx.grad(row_loss, argnums=(0, 1))(model, x)

    results, row_grads = run(model, X)
    for (_, out), grads in results:
        np.testing.assert_array_equal(out[1, 3:], 0.0)
        assert np.all(out[0] != 0)
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The padded rows are constant: their output sends no gradient anywhere.
    for g in jax.tree.leaves(row_grads):
        np.testing.assert_array_equal(g, 0.0)


def test_sow_weights_with_capture():
    model = _flax_mha(sl.dot_product_attention)
    mask = _padding_mask()

    @nnx.jit
    @nnx.capture(nnx.Intermediate)
    def forward(model, x):
        return model(x, mask=mask, sow_weights=True)

    _, intermediates = forward(model, X)
    [weights] = intermediates["attention_weights"].get_value()
    assert weights.shape == (BATCH, HEADS, LENGTH, LENGTH)
    np.testing.assert_array_equal(weights[1, :, 3:], 0.0)
    np.testing.assert_allclose(weights[0].sum(-1), 1.0, rtol=1e-6)


def test_is_causal_is_passed_through():
    ours = _flax_mha(sl.dot_product_attention)
    theirs = _flax_mha(dropout_rate=0.1)  # Flax's own masking path honours is_causal
    np.testing.assert_allclose(
        _forward(ours, X, is_causal=True),
        _forward(theirs, X, is_causal=True, deterministic=True),
        atol=1e-5,
    )


# ---------------------------------------------------------------------------------------
# stablelayers.nnx.MultiHeadAttention
# ---------------------------------------------------------------------------------------


def test_multi_head_attention_is_flax_class_with_our_attention():
    ours = slnnx.MultiHeadAttention(HEADS, FEATURES, decode=False, rngs=nnx.Rngs(_key(0)))
    assert isinstance(ours, nnx.MultiHeadAttention)
    assert ours.attention_fn is sl.dot_product_attention
    theirs = _flax_mha(sl.dot_product_attention)
    mask = _padding_mask()
    np.testing.assert_array_equal(_forward(ours, X, mask=mask), _forward(theirs, X, mask=mask))


@pytest.mark.parametrize(
    ("broadcast_dropout", "num_kv_heads"), [(True, None), (False, None), (False, 1)]
)
def test_multi_head_attention_with_dropout_matches_flax_class(broadcast_dropout, num_kv_heads):
    # The drop-in against Flax's own layer (its own attention function), dropout on at a
    # rate that makes any other pattern obvious: same rngs, so the same parameters and the
    # same dropout key; outputs and parameter gradients agree to float32 rounding. Mask
    # rows are never empty, where the two differ on purpose.
    kwargs = {
        "dropout_rate": 0.5,
        "broadcast_dropout": broadcast_dropout,
        "num_kv_heads": num_kv_heads,
        "decode": False,
    }
    ours = slnnx.MultiHeadAttention(HEADS, FEATURES, rngs=nnx.Rngs(_key(0)), **kwargs)
    theirs = nnx.MultiHeadAttention(HEADS, FEATURES, rngs=nnx.Rngs(_key(0)), **kwargs)
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(ours, nnx.Param)),
        nnx.to_pure_dict(nnx.state(theirs, nnx.Param)),
    )
    mask = _mask((BATCH, 1, LENGTH, LENGTH))
    cotangent = _normal((BATCH, LENGTH, FEATURES), 7)

    @nnx.jit
    def run(model, key):
        def loss(model):
            out = model(X, mask=mask, deterministic=False, rngs=nnx.Rngs(dropout=key))
            return jnp.sum(out * cotangent), out

        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return out, nnx.to_pure_dict(grads)

    out, grads = run(ours, _key(3))
    expected, expected_grads = run(theirs, _key(3))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        grads,
        expected_grads,
    )
    # Dropout did act, and the pattern depends on broadcast_dropout.
    assert not np.allclose(out, _forward(ours, X, mask=mask, deterministic=True), atol=1e-3)


def test_multi_head_attention_with_sinks():
    model = slnnx.MultiHeadAttention(
        HEADS, FEATURES, sink=True, use_bias=False, decode=False, rngs=nnx.Rngs(_key(0))
    )
    assert model.attention_fn.sink.shape == (HEADS,)
    # Same projections as Flax's class from the same rngs: the sink takes no randomness.
    flax_params = nnx.to_pure_dict(nnx.state(_flax_mha(use_bias=False), nnx.Param))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(params.pop("attention_fn")["sink"], np.zeros(HEADS))
    jax.tree.map(np.testing.assert_array_equal, params, flax_params)

    model.attention_fn.sink[...] = jnp.array([1.0, -1.0])
    mask = _padding_mask()
    loss = lambda model: jnp.sum(model(X, mask=mask) ** 2)  # noqa: E731
    grads = nnx.jit(nnx.grad(loss))(model)
    assert np.all(np.isfinite(grads["attention_fn"]["sink"][...]))
    assert np.all(grads["attention_fn"]["sink"][...] != 0)

    with jax.enable_x64(True):
        model = slnnx.MultiHeadAttention(
            HEADS, 4, sink=True, decode=False, param_dtype=jnp.float64, rngs=nnx.Rngs(_key(0))
        )
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x = _normal((1, 3, 4), 8, np.float64)
        mask = _padding_mask((2,))[..., :3, :3]
        apply = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(x, mask=mask))
        check_grads(apply, (params,), 1, modes=("rev",))


def test_errors_are_raised_early():
    with pytest.raises(ValueError, match="positive"):
        slnnx.Softplus(beta=0.0)
    with pytest.raises(TypeError, match="beta"):
        slnnx.Softplus(beta="large")
    with pytest.raises(TypeError, match="axis"):
        slnnx.Softmax(axis=1.5)
    with pytest.raises(ValueError, match="twice"):
        slnnx.LogSoftmax(axis=(1, 1))
    with pytest.raises(ValueError, match="at least 1"):
        slnnx.MaskedSoftmax(num_heads=0)
    with pytest.raises(ValueError, match="num_heads=3"):
        slnnx.MaskedSoftmax(num_heads=3)(LOGITS)
    with pytest.raises(ValueError, match="num_heads=3"):
        slnnx.DotProductAttention(num_heads=3)(*CASES["attention_sink"][1])
    with pytest.raises(ValueError, match="attention_fn"):
        slnnx.MultiHeadAttention(
            2, 8, sink=True, attention_fn=nnx.dot_product_attention, rngs=nnx.Rngs(_key(0))
        )


def test_imports_without_equinox():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'equinox':\n"
        "            raise ImportError('equinox is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import stablelayers.nnx\n"
        "assert 'equinox' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
