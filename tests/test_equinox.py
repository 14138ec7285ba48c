"""stablelayers.equinox, and its MultiHeadAttention against equinox.nn.MultiheadAttention."""

import io
import subprocess
import sys

import pytest

pytest.importorskip("equinox")

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

import stablelayers as sl
from stablelayers import equinox as sleqx


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


def _with_sink(layer):
    return eqx.tree_at(lambda m: m.sink, layer, SINK.astype(layer.sink.dtype))


# (layer, call arguments, the functional-core result it must equal)
CASES = {
    "softmax": (
        lambda: sleqx.Softmax(axis=(-2, -1)),
        (LOGITS, WHERE),
        lambda: sl.softmax(LOGITS, axis=(-2, -1), where=WHERE),
    ),
    "log_softmax": (
        lambda: sleqx.LogSoftmax(),
        (LOGITS, WHERE),
        lambda: sl.log_softmax(LOGITS, where=WHERE),
    ),
    "softplus": (
        lambda: sleqx.Softplus(beta=2.0),
        (LOGITS,),
        lambda: sl.softplus(LOGITS, 2.0),
    ),
    "softplus_learnable": (
        lambda: sleqx.Softplus(beta=2.0, learnable=True),
        (LOGITS,),
        lambda: sl.softplus(LOGITS, jnp.exp(jnp.log(jnp.float32(2.0)))),
    ),
    "masked_softmax": (
        lambda: sleqx.MaskedSoftmax(),
        (LOGITS, WHERE),
        lambda: sl.masked_softmax(LOGITS, where=WHERE),
    ),
    "masked_softmax_sink": (
        lambda: _with_sink(sleqx.MaskedSoftmax(num_heads=4, sink=True)),
        (LOGITS, WHERE),
        lambda: sl.masked_softmax(LOGITS, where=WHERE, sink=SINK[:, None]),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_layers_match_the_functional_core_under_jit_vmap_and_grad(name):
    make, args, expected = CASES[name]

    # One jit around everything: compiling dominates the run time of these tests.
    @eqx.filter_jit
    def run(layer, args):
        x, rest = args[0], args[1:]
        out = layer(*args)
        # Map over the leading batch axis; the parameters are shared.
        vmapped = jax.vmap(lambda *a: layer(*(a_[None] for a_ in a))[0])(*args)
        loss = lambda layer_and_x: jnp.sum(jnp.tanh(layer_and_x[0](layer_and_x[1], *rest)))  # noqa: E731
        grads = eqx.filter_grad(loss)((layer, x))
        # The layers fit in eqx.nn.Sequential, which passes `key`.
        sequential = eqx.nn.Sequential([layer])(x, key=_key(0)) if not rest else out
        return out, vmapped, grads, sequential, expected()

    layer = make()
    out, vmapped, (layer_grads, x_grad), sequential, expected = run(layer, args)
    # Layer and core compile into different fusions: an attention output near 0 (a sum of
    # terms of size ~1) may differ by a float32 ulp of those terms, 1.2e-7.
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=2.5e-7)
    np.testing.assert_allclose(vmapped, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sequential, out)
    assert np.all(np.isfinite(x_grad))
    params = jax.tree.leaves(eqx.filter(layer, eqx.is_inexact_array))
    assert len(jax.tree.leaves(layer_grads)) == len(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(layer_grads))


def test_learnable_beta_and_sink_gradients_match_finite_differences():
    with jax.enable_x64(True):
        x = jnp.linspace(-4.0, 4.0, 9)
        softplus = sleqx.Softplus(beta=1.7, learnable=True)
        assert softplus.log_beta.dtype == jnp.float64
        apply = jax.jit(lambda b, x: eqx.tree_at(lambda m: m.log_beta, softplus, b)(x))
        check_grads(apply, (softplus.log_beta, x), 1, modes=("rev",))

        logits = LOGITS.astype(jnp.float64)
        where = WHERE.at[0, 1, 2].set(False)  # one empty row
        masked = sleqx.MaskedSoftmax(4, sink=True)
        apply = jax.jit(lambda s, x: eqx.tree_at(lambda m: m.sink, masked, s)(x, where))
        check_grads(apply, (SINK.astype(jnp.float64), logits), 1, modes=("rev",))


def test_leaves_round_trip_through_tree_serialise_leaves():
    model = _with_sink(sleqx.MultiHeadAttention(4, 16, sink=True, key=_key(0)))
    softplus = eqx.tree_at(lambda m: m.log_beta, sleqx.Softplus(3.0, True), jnp.float32(0.2))
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (model, softplus))
    buffer.seek(0)
    like = (
        sleqx.MultiHeadAttention(4, 16, sink=True, key=_key(1)),
        sleqx.Softplus(1.0, True),
    )
    restored = eqx.tree_deserialise_leaves(buffer, like)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves((model, softplus)), strict=True):
        np.testing.assert_array_equal(a, b)
    x = _normal((3, 16), 2)
    np.testing.assert_array_equal(_call(restored[0], x, x, x), _call(model, x, x, x))
    np.testing.assert_array_equal(restored[1](x), softplus(x))


# ---------------------------------------------------------------------------------------
# MultiHeadAttention against equinox.nn.MultiheadAttention
# ---------------------------------------------------------------------------------------

Q_LEN, KV_LEN = 4, 6
QUERY, KEY_, VALUE = _normal((Q_LEN, 16), 3), _normal((KV_LEN, 12), 4), _normal((KV_LEN, 10), 5)
SIZES = {"key_size": 12, "value_size": 10, "output_size": 7, "qk_size": 5, "vo_size": 3}


def _pair(sink=False, **kwargs):
    kwargs = {**SIZES, "key": _key(0), **kwargs}
    ours = sleqx.MultiHeadAttention(4, 16, sink=sink, **kwargs)
    theirs = eqx.nn.MultiheadAttention(4, 16, **kwargs)
    return ours, theirs


@eqx.filter_jit
def _call(model, *args, **kwargs):
    return model(*args, **kwargs)


@pytest.mark.parametrize(
    ("mask_shape", "biases"),
    [(None, False), ((Q_LEN, KV_LEN), True), ((4, Q_LEN, KV_LEN), False)],
)
def test_matches_equinox_where_no_row_is_empty(mask_shape, biases):
    flags = ("use_query_bias", "use_key_bias", "use_value_bias", "use_output_bias")
    ours, theirs = _pair(**dict.fromkeys(flags, biases))
    # The same key gives the same weights.
    ours_leaves, theirs_leaves = jax.tree.leaves(ours), jax.tree.leaves(theirs)
    assert len(ours_leaves) == len(theirs_leaves)
    for a, b in zip(ours_leaves, theirs_leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    mask = None if mask_shape is None else _mask(mask_shape)
    np.testing.assert_allclose(
        _call(ours, QUERY, KEY_, VALUE, mask),
        _call(theirs, QUERY, KEY_, VALUE, mask),
        atol=1e-5,
    )


def test_process_heads_is_applied():
    ours, theirs = _pair()

    def process_heads(q, k, v):
        return 2.0 * q, jnp.flip(k, axis=0), v + 1.0

    np.testing.assert_allclose(
        _call(ours, QUERY, KEY_, VALUE, process_heads=process_heads),
        _call(theirs, QUERY, KEY_, VALUE, process_heads=process_heads),
        atol=1e-5,
    )


def test_padded_rows_are_exactly_zero_and_pass_no_gradient():
    ours, theirs = _pair()
    valid_q, valid_kv = jnp.arange(Q_LEN) < 2, jnp.arange(KV_LEN) < 3
    mask = valid_q[:, None] & valid_kv[None, :]
    out = _call(ours, QUERY, KEY_, VALUE, mask)
    np.testing.assert_array_equal(out[2:], 0.0)
    np.testing.assert_allclose(out[:2], _call(theirs, QUERY, KEY_, VALUE, mask)[:2], atol=1e-5)
    # Equinox's own layer returns the mean of the values there instead.
    assert np.all(_call(theirs, QUERY, KEY_, VALUE, mask)[2:] != 0)

    @eqx.filter_jit
    @eqx.filter_grad
    def padded_grads(model_and_inputs):
        model, q, k, v = model_and_inputs
        return jnp.sum(model(q, k, v, mask)[2:])

    for g in jax.tree.leaves(padded_grads((ours, QUERY, KEY_, VALUE))):
        np.testing.assert_array_equal(g, 0.0)

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(model):
        return jnp.sum(model(QUERY, KEY_, VALUE, mask) ** 2)

    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads(ours)))


def test_vmap_over_a_batch():
    ours, _ = _pair()
    batch = lambda a: jnp.stack([a, 2 * a])  # noqa: E731
    mask = _mask((2, Q_LEN, KV_LEN))
    batched = eqx.filter_jit(lambda m, *a: jax.vmap(m)(*a))
    out = batched(ours, batch(QUERY), batch(KEY_), batch(VALUE), mask)
    np.testing.assert_allclose(
        out[1], _call(ours, 2 * QUERY, 2 * KEY_, 2 * VALUE, mask[1]), 1e-5
    )


def test_dropout():
    ours, _ = _pair(dropout_p=0.5)
    plain = _call(ours, QUERY, KEY_, VALUE, inference=True)
    dropped = _call(ours, QUERY, KEY_, VALUE, key=_key(1))
    assert dropped.shape == plain.shape and not np.allclose(dropped, plain)
    np.testing.assert_array_equal(_call(eqx.nn.inference_mode(ours), QUERY, KEY_, VALUE), plain)
    with pytest.raises(RuntimeError, match="key"):
        ours(QUERY, KEY_, VALUE)

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(model):
        return jnp.sum(model(QUERY, KEY_, VALUE, key=_key(2)) ** 2)

    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads(ours)))


def test_equinox_spelling_is_the_class():
    # Equinox spells it MultiheadAttention; stablelayers' other layers MultiHeadAttention.
    assert sleqx.MultiheadAttention is sleqx.MultiHeadAttention
    assert sleqx.MultiheadAttention.__name__ == "MultiheadAttention"


@pytest.mark.parametrize("mask_shape", [None, (Q_LEN, KV_LEN), (4, Q_LEN, KV_LEN)])
def test_dropout_draws_equinox_pattern(mask_shape):
    # The same key drops the same weights as equinox.nn.MultiheadAttention: outputs and
    # gradients agree to float rounding with dropout on.
    ours, theirs = _pair(dropout_p=0.3)
    mask = None if mask_shape is None else _mask(mask_shape)
    np.testing.assert_allclose(
        _call(ours, QUERY, KEY_, VALUE, mask, key=_key(7)),
        _call(theirs, QUERY, KEY_, VALUE, mask, key=_key(7)),
        atol=1e-6,
    )

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(model):
        return jnp.sum(model(QUERY, KEY_, VALUE, mask, key=_key(8)) ** 2)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(theirs)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sinks():
    ours, theirs = _pair(sink=True)
    assert ours.sink.shape == (4,)
    mask = _mask((Q_LEN, KV_LEN))
    # A sink of -inf takes no mass: the layer is then equinox's own.
    no_sink = eqx.tree_at(lambda m: m.sink, ours, jnp.full(4, -jnp.inf))
    np.testing.assert_allclose(
        _call(no_sink, QUERY, KEY_, VALUE, mask), _call(theirs, QUERY, KEY_, VALUE, mask), 1e-5
    )
    with jax.enable_x64(True):
        model = _with_sink(sleqx.MultiHeadAttention(4, 8, sink=True, key=_key(0)))
        x = _normal((3, 8), 6, np.float64)
        mask = jnp.array([[True, True, False], [True, False, False], [False, False, False]])
        params, static = eqx.partition(model, eqx.is_inexact_array)
        apply = jax.jit(lambda p: eqx.combine(p, static)(x, x, x, mask))
        check_grads(apply, (params,), 1, modes=("rev",))


def test_errors_are_raised_early():
    with pytest.raises(ValueError, match="positive"):
        sleqx.Softplus(beta=0.0)
    with pytest.raises(TypeError, match="axis"):
        sleqx.Softmax(axis="last")
    with pytest.raises(ValueError, match="num_heads=3"):
        sleqx.MaskedSoftmax(num_heads=3)(LOGITS)
    ours, _ = _pair()
    with pytest.raises(ValueError, match="mask"):
        ours(QUERY, KEY_, VALUE, jnp.ones((KV_LEN, Q_LEN), bool))
    with pytest.raises(ValueError, match="vmap"):
        ours(QUERY[None], KEY_, VALUE)
    with pytest.raises(ValueError, match="equal length"):
        ours(QUERY, KEY_, VALUE[:2])
    with pytest.raises(ValueError, match="at least 1"):
        sleqx.MultiHeadAttention(8, 4, key=_key(0))


def test_imports_without_flax():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'flax':\n"
        "            raise ImportError('flax is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import stablelayers.equinox\n"
        "assert 'flax' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_learnable_softplus_runs_under_x64():
    x = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.float32)
    with jax.enable_x64(True):
        layer = sleqx.Softplus(beta=2.0, learnable=True)
        y = layer(x)
        grads = jax.grad(lambda m: m(x).sum())(layer)
    assert y.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(y)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
