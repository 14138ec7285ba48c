"""stablelayers.linen, its agreement with stablelayers.nnx, and dot_product_attention inside
flax.linen.MultiHeadDotProductAttention."""

import functools
import subprocess
import sys

import pytest

pytest.importorskip("flax")

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.test_util import check_grads

import stablelayers as sl
from stablelayers import linen as sllinen
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


LOGITS = _normal((2, 4, 3, 5))
WHERE = _mask((2, 4, 3, 5))
SINK = jnp.array([0.5, -1.0, 2.0, 0.0])
QKV = (_normal((2, 3, 4, 8), 2), _normal((2, 5, 4, 8), 3), _normal((2, 5, 4, 8), 4))


def _init(module, *args):
    variables = module.init(_key(0), *args)
    params = variables.get("params", {})
    if "sink" in params:
        params = {**params, "sink": SINK.astype(params["sink"].dtype)}
    return {"params": params}


# (Linen layer, its NNX twin, call arguments, the functional-core result)
CASES = {
    "softmax": (
        sllinen.Softmax(axis=(-2, -1)),
        lambda: slnnx.Softmax(axis=(-2, -1)),
        (LOGITS, WHERE),
        lambda: sl.softmax(LOGITS, axis=(-2, -1), where=WHERE),
    ),
    "log_softmax": (
        sllinen.LogSoftmax(),
        lambda: slnnx.LogSoftmax(),
        (LOGITS, WHERE),
        lambda: sl.log_softmax(LOGITS, where=WHERE),
    ),
    "softplus": (
        sllinen.Softplus(beta=2.0),
        lambda: slnnx.Softplus(beta=2.0),
        (LOGITS,),
        lambda: sl.softplus(LOGITS, 2.0),
    ),
    "softplus_learnable": (
        sllinen.Softplus(beta=2.0, learnable=True),
        lambda: slnnx.Softplus(beta=2.0, learnable=True),
        (LOGITS,),
        lambda: sl.softplus(LOGITS, jnp.exp(jnp.log(jnp.float32(2.0)))),
    ),
    "masked_softmax": (
        sllinen.MaskedSoftmax(),
        lambda: slnnx.MaskedSoftmax(),
        (LOGITS, WHERE),
        lambda: sl.masked_softmax(LOGITS, where=WHERE),
    ),
    "masked_softmax_sink": (
        sllinen.MaskedSoftmax(num_heads=4, sink=True),
        lambda: slnnx.MaskedSoftmax(num_heads=4, sink=True),
        (LOGITS, WHERE),
        lambda: sl.masked_softmax(LOGITS, where=WHERE, sink=SINK[:, None]),
    ),
    "attention_sink": (
        sllinen.DotProductAttention(num_heads=4, sink=True),
        lambda: slnnx.DotProductAttention(num_heads=4, sink=True),
        QKV,
        lambda: sl.dot_product_attention(*QKV, sink=SINK),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_layers_match_the_functional_core_under_jit_vmap_and_grad(name):
    layer, _, args, expected = CASES[name]
    variables = _init(layer, *args)

    # One jit around everything: compiling dominates the run time of these tests.
    @jax.jit
    def run(variables, args):
        x, rest = args[0], args[1:]
        out = layer.apply(variables, *args)
        # Map over the leading batch axis; the parameters are shared.
        one = lambda *a: layer.apply(variables, *(a_[None] for a_ in a))[0]  # noqa: E731
        loss = lambda v, x: jnp.sum(jnp.tanh(layer.apply(v, x, *rest)))  # noqa: E731
        grads = jax.grad(loss, argnums=(0, 1))(variables, x)
        return out, jax.vmap(one)(*args), grads, expected()

    out, vmapped, (param_grads, x_grad), expected = run(variables, args)
    # Layer and core compile into different fusions: an attention output near 0 (a sum of
    # terms of size ~1) may differ by a float32 ulp of those terms, 1.2e-7.
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=2.5e-7)
    np.testing.assert_allclose(vmapped, expected, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(x_grad))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(param_grads))


@pytest.mark.parametrize("name", CASES)
def test_nnx_and_linen_agree_for_equal_parameters(name):
    layer, make_twin, args, _ = CASES[name]
    variables = _init(layer, *args)
    twin = make_twin()
    state = nnx.state(twin, nnx.Param)
    nnx.replace_by_pure_dict(state, variables["params"])
    nnx.update(twin, state)
    np.testing.assert_array_equal(twin(*args), layer.apply(variables, *args))


@pytest.mark.parametrize("name", ["softplus_learnable", "masked_softmax_sink"])
def test_params_round_trip_through_flax_serialization(name):
    layer, _, args, _ = CASES[name]
    variables = _init(layer, *args)
    data = flax.serialization.to_bytes(variables)
    template = jax.tree.map(jnp.zeros_like, variables)
    restored = flax.serialization.from_bytes(template, data)
    np.testing.assert_array_equal(layer.apply(restored, *args), layer.apply(variables, *args))
    state_dict = flax.serialization.to_state_dict(variables)
    restored = flax.serialization.from_state_dict(template, state_dict)
    np.testing.assert_array_equal(layer.apply(restored, *args), layer.apply(variables, *args))


def test_learnable_beta_and_sink_gradients_match_finite_differences():
    with jax.enable_x64(True):
        x = jnp.linspace(-4.0, 4.0, 9)
        softplus = sllinen.Softplus(beta=1.7, learnable=True, param_dtype=jnp.float64)
        variables = softplus.init(_key(0), x)
        check_grads(jax.jit(softplus.apply), (variables, x), 1, modes=("rev",))

        logits = LOGITS.astype(jnp.float64)
        where = WHERE.at[0, 1, 2].set(False)  # one empty row
        masked = sllinen.MaskedSoftmax(4, sink=True, param_dtype=jnp.float64)
        variables = {"params": {"sink": SINK.astype(jnp.float64)}}
        apply = jax.jit(lambda v, x: masked.apply(v, x, where))
        check_grads(apply, (variables, logits), 1, modes=("rev",))


# ---------------------------------------------------------------------------------------
# flax.linen.MultiHeadDotProductAttention(attention_fn=stablelayers.dot_product_attention)
# ---------------------------------------------------------------------------------------

BATCH, LENGTH, FEATURES, HEADS = 2, 5, 8, 2
X = _normal((BATCH, LENGTH, FEATURES), 6)


def _padding_mask(valid=(5, 3)):
    """Key padding for sequences of the given lengths: the query rows of padded positions
    may attend nothing, so they are fully masked."""
    valid = jnp.arange(LENGTH)[None, :] < jnp.asarray(valid)[:, None]
    return nn.make_attention_mask(valid, valid)


@functools.partial(jax.jit, static_argnames=("module", "deterministic"))
def _apply(module, variables, x, rng=None, mask=None, deterministic=None):
    rngs = None if rng is None else {"dropout": rng}
    return module.apply(variables, x, mask=mask, deterministic=deterministic, rngs=rngs)


def test_matches_flax_attention_where_no_row_is_empty():
    mask = _mask((BATCH, 1, LENGTH, LENGTH))
    ours = nn.MultiHeadDotProductAttention(HEADS, attention_fn=sl.dot_product_attention)
    theirs = nn.MultiHeadDotProductAttention(HEADS)
    variables = theirs.init(_key(0), X)
    # Relative 1e-5, with an absolute floor for outputs that cancel to near 0 (one such
    # entry differs by 3e-8, a few float32 roundings of the O(1) terms it sums).
    np.testing.assert_allclose(
        _apply(ours, variables, X, mask=mask),
        _apply(theirs, variables, X, mask=mask),
        rtol=1e-5,
        atol=1e-6,
    )


def test_dropout_matches_flax_attention_given_the_same_rng():
    mask = _mask((BATCH, 1, LENGTH, LENGTH))
    ours = nn.MultiHeadDotProductAttention(
        HEADS, attention_fn=sl.dot_product_attention, dropout_rate=0.5
    )
    theirs = nn.MultiHeadDotProductAttention(HEADS, dropout_rate=0.5)
    variables = theirs.init(_key(0), X, deterministic=True)
    rng = _key(3)
    out = _apply(ours, variables, X, rng, mask=mask, deterministic=False)
    expected = _apply(theirs, variables, X, rng, mask=mask, deterministic=False)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert not np.allclose(out, _apply(ours, variables, X, mask=mask, deterministic=True))


def test_fully_masked_query_row_is_zero_with_finite_gradients():
    model = nn.MultiHeadDotProductAttention(
        HEADS, attention_fn=sl.dot_product_attention, use_bias=False, dropout_rate=0.3
    )
    mask = _padding_mask()
    variables = model.init(_key(0), X, deterministic=True)

    @jax.jit
    def run(variables, x):
        def loss(variables, x, deterministic):
            rngs = {"dropout": _key(1)}
            out = model.apply(variables, x, mask=mask, deterministic=deterministic, rngs=rngs)
            return jnp.sum(out**2), out

        def row_loss(variables, x):
            return jnp.sum(model.apply(variables, x, mask=mask, deterministic=True)[1, 3:])

        grad = jax.value_and_grad(loss, has_aux=True)
        # Forward and backward with dropout off and on.
        results = [grad(variables, x, deterministic) for deterministic in (True, False)]
        return results, jax.grad(row_loss, argnums=(0, 1))(variables, x)

    results, row_grads = run(variables, X)
    for (_, out), grads in results:
        np.testing.assert_array_equal(out[1, 3:], 0.0)
        assert np.all(out[0] != 0)
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The padded rows are constant: their output sends no gradient anywhere.
    for g in jax.tree.leaves(row_grads):
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("sink", [False, True])
def test_sow_weights(sink):
    model = sllinen.MultiHeadAttention(HEADS, sink=sink, dropout_rate=0.5)
    mask = _padding_mask()
    variables = model.init(_key(0), X, deterministic=True)

    @jax.jit
    def grad_and_weights(variables, x):
        # Forward and backward with sow_weights=True and dropout on.
        def loss(variables, x):
            out, state = model.apply(
                variables,
                x,
                mask=mask,
                deterministic=False,
                sow_weights=True,
                rngs={"dropout": _key(1)},
                mutable=["intermediates"],
            )
            return jnp.sum(out**2), state

        return jax.grad(loss, has_aux=True)(variables, x)

    grads, state = grad_and_weights(variables, X)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    [weights] = state["intermediates"]["attention_weights"]
    assert weights.shape == (BATCH, HEADS, LENGTH, LENGTH)
    np.testing.assert_array_equal(weights[1, :, 3:], 0.0)
    if not sink:
        np.testing.assert_allclose(weights[0].sum(-1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# stablelayers.linen.MultiHeadAttention
# ---------------------------------------------------------------------------------------


def test_multi_head_attention_is_flax_class_with_our_attention():
    ours = sllinen.MultiHeadAttention(HEADS)
    assert isinstance(ours, nn.MultiHeadDotProductAttention)
    assert ours.attention_fn is sl.dot_product_attention
    theirs = nn.MultiHeadDotProductAttention(HEADS, attention_fn=sl.dot_product_attention)
    variables = ours.init(_key(0), X)
    jax.tree.map(np.testing.assert_array_equal, variables, theirs.init(_key(0), X))
    mask = _padding_mask()
    np.testing.assert_array_equal(
        _apply(ours, variables, X, mask=mask), _apply(theirs, variables, X, mask=mask)
    )


@pytest.mark.parametrize("broadcast_dropout", [True, False])
def test_multi_head_attention_with_dropout_matches_flax_class(broadcast_dropout):
    # The drop-in against Flax's own layer (its own attention function) with dropout on at a
    # rate that makes any other pattern obvious: the same variables and dropout rng give the
    # same output and the same parameter gradients, to float32 rounding. Mask rows are never
    # empty, where the two differ on purpose.
    kwargs = {"dropout_rate": 0.5, "broadcast_dropout": broadcast_dropout}
    ours = sllinen.MultiHeadAttention(HEADS, **kwargs)
    theirs = nn.MultiHeadDotProductAttention(HEADS, **kwargs)
    variables = theirs.init(_key(0), X, deterministic=True)
    jax.tree.map(
        np.testing.assert_array_equal, variables, ours.init(_key(0), X, deterministic=True)
    )
    mask = _mask((BATCH, 1, LENGTH, LENGTH))
    cotangent = _normal((BATCH, LENGTH, FEATURES), 7)

    @functools.partial(jax.jit, static_argnames="module")
    def run(module, variables, rng):
        def loss(variables):
            out = _apply(module, variables, X, rng, mask=mask, deterministic=False)
            return jnp.sum(out * cotangent), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(variables)
        return out, grads

    out, grads = run(ours, variables, _key(3))
    expected, expected_grads = run(theirs, variables, _key(3))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        grads,
        expected_grads,
    )
    # Dropout did act.
    assert not np.allclose(out, _apply(ours, variables, X, mask=mask, deterministic=True))


def test_multi_head_attention_with_sinks():
    model = sllinen.MultiHeadAttention(HEADS, sink=True)
    variables = model.init(_key(0), X)
    params = dict(variables["params"])
    np.testing.assert_array_equal(params.pop("attention_fn")["sink"], np.zeros(HEADS))
    # The projections are Flax's: the sink takes no randomness and changes no names.
    flax_params = nn.MultiHeadDotProductAttention(HEADS).init(_key(0), X)["params"]
    jax.tree.map(np.testing.assert_array_equal, params, dict(flax_params))

    mask = _padding_mask()
    variables = {"params": {**params, "attention_fn": {"sink": jnp.array([1.0, -1.0])}}}
    loss = lambda v: jnp.sum(model.apply(v, X, mask=mask) ** 2)  # noqa: E731
    sink_grad = jax.jit(jax.grad(loss))(variables)["params"]["attention_fn"]["sink"]
    assert np.all(np.isfinite(sink_grad)) and np.all(sink_grad != 0)

    with jax.enable_x64(True):
        model = sllinen.MultiHeadAttention(HEADS, sink=True, param_dtype=jnp.float64)
        x = _normal((1, 3, 4), 8, np.float64)
        variables = jax.jit(model.init)(_key(0), x)
        mask = _padding_mask((2,))[..., :3, :3]
        apply = jax.jit(lambda v: model.apply(v, x, mask=mask))
        check_grads(apply, (variables,), 1, modes=("rev",))


def test_multi_head_attention_with_sinks_as_a_submodule_and_clone():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return sllinen.MultiHeadAttention(HEADS, sink=True, name="attn")(x)

    variables = Block().init(_key(0), X)
    assert variables["params"]["attn"]["attention_fn"]["sink"].shape == (HEADS,)
    model = sllinen.MultiHeadAttention(HEADS, sink=True)
    np.testing.assert_array_equal(
        Block().apply(variables, X),
        model.clone().apply({"params": variables["params"]["attn"]}, X),
    )


def test_nnx_and_linen_multi_head_attention_agree_for_equal_parameters():
    mask = _padding_mask()
    linen_model = sllinen.MultiHeadAttention(HEADS, sink=True, dropout_rate=0.1)
    variables = linen_model.init(_key(0), X, deterministic=True)
    params = {**variables["params"], "attention_fn": {"sink": jnp.array([0.7, -0.4])}}
    nnx_model = slnnx.MultiHeadAttention(
        HEADS, FEATURES, sink=True, dropout_rate=0.1, decode=False, rngs=nnx.Rngs(_key(5))
    )
    state = nnx.state(nnx_model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(nnx_model, state)
    np.testing.assert_array_equal(
        nnx_model(X, mask=mask, deterministic=True),
        linen_model.apply({"params": params}, X, mask=mask, deterministic=True),
    )


def test_errors_are_raised_early():
    with pytest.raises(ValueError, match="positive"):
        sllinen.Softplus(beta=-1.0)
    with pytest.raises(TypeError, match="axis"):
        sllinen.Softmax(axis="last")
    assert sllinen.LogSoftmax(axis=[0, 1]).axis == (0, 1)  # hashable, as Linen needs
    with pytest.raises(ValueError, match="at least 1"):
        sllinen.MaskedSoftmax(num_heads=0)
    with pytest.raises(ValueError, match="num_heads=3"):
        sllinen.MaskedSoftmax(num_heads=3).init(_key(0), LOGITS)
    with pytest.raises(ValueError, match="attention_fn"):
        sllinen.MultiHeadAttention(2, sink=True, attention_fn=nn.dot_product_attention)


def test_imports_without_equinox():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'equinox':\n"
        "            raise ImportError('equinox is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import stablelayers.linen\n"
        "assert 'equinox' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
