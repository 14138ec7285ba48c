"""Every public function and layer under JAX's strictest settings, the ones the peers'
suites test with: float64 on (``jax_enable_x64``), implicit rank promotion an error, and
``jax.debug_infs`` / ``jax.debug_nans`` (eager and jit) for inputs whose math needs no inf
or NaN. Hypothesis draws the inputs; each property also holds with every setting off (the
rest of the suite).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _edge_inputs import attention_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablelayers as sl

# Few examples, and fixed shapes: hypothesis varies the values, so each setting compiles
# every op once (a new shape per example would recompile everything, on two cores).
SETTINGS = settings(deadline=None, max_examples=20)
finite = st.floats(-30.0, 30.0, width=32)
ROW_SHAPE = (3, 5)
BATCH, Q_LEN, KV_LEN, HEADS, KV_HEADS, DIM = 2, 5, 4, 2, 1, 4


@contextlib.contextmanager
def strict_settings(x64, mode="eager"):
    """x64 on or off, rank promotion 'raise', debug_infs and debug_nans on."""
    with (
        jax.enable_x64(x64),
        jax.numpy_rank_promotion("raise"),
        jax.debug_infs(True),
        jax.debug_nans(True),
    ):
        yield (lambda f: f) if mode == "eager" else jax.jit


# Eager layers compile every primitive afresh: once, with x64 (the setting that changes
# dtypes); jit with both.
MODES = pytest.mark.parametrize(
    ("mode", "x64"), [("eager", True), ("jit", False), ("jit", True)]
)


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


ROW_OPS = {
    "softmax": lambda x, m: sl.softmax(x, where=m),
    "log_softmax-unmasked": lambda x, m: sl.log_softmax(x),
    "masked_softmax": lambda x, m: sl.masked_softmax(x, where=m),
    "masked_softmax-sink": lambda x, m: sl.masked_softmax(
        x, where=m, sink=jnp.zeros(x.shape[:-1], x.dtype)
    ),
    "softplus": lambda x, m: sl.softplus(x, 1.5),
    "softplus-array-beta": lambda x, m: sl.softplus(x, jnp.full(x.shape, 0.5, x.dtype)),
}


def _row_value_and_grad(name):
    op = ROW_OPS[name]

    def loss(x, mask):
        y = op(x, mask)
        return jnp.sum(jnp.where(jnp.isfinite(y), y, 0.0) * jnp.cos(x)), y

    return jax.grad(loss, has_aux=True)


# Built once, so that jit's cache holds across hypothesis' examples.
ROW_CALLS = {
    (name, mode): jax.jit(_row_value_and_grad(name))
    if mode == "jit"
    else _row_value_and_grad(name)
    for name in ROW_OPS
    for mode in ("eager", "jit")
}


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("name", sorted(ROW_OPS))
@SETTINGS
@given(
    x=hnp.arrays(np.float32, ROW_SHAPE, elements=finite),
    mask=hnp.arrays(np.bool_, ROW_SHAPE),
)
def test_row_ops_and_their_gradients_under_strict_settings(name, mode, x64, x, mask):
    with strict_settings(x64):
        grad, y = ROW_CALLS[name, mode](x, mask)
    assert y.dtype == jnp.float32 and grad.dtype == jnp.float32
    if name == "softmax":
        np.testing.assert_array_equal(np.asarray(y)[~mask], 0.0)
        np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
    else:
        assert _finite(y)
    assert _finite(grad)


def _attention_value_and_grad(implementation, causal):
    def loss(q, k, v, sink, mask, q_lengths, kv_lengths):
        out = sl.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            sink=sink,
            is_causal=causal,
            query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths,
            implementation=implementation,
            chunk_size=2,
        )
        return jnp.sum(out * out), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)


ATTENTION_CALLS = {
    (implementation, causal, mode): (
        jax.jit(_attention_value_and_grad(implementation, causal))
        if mode == "jit"
        else _attention_value_and_grad(implementation, causal)
    )
    for implementation in ("dense", "chunked")
    for causal in (False, True)
    for mode in ("eager", "jit")
}


ATTENTION_INPUTS = {
    "q": hnp.arrays(np.float32, (BATCH, Q_LEN, HEADS, DIM), elements=finite),
    "k": hnp.arrays(np.float32, (BATCH, KV_LEN, KV_HEADS, DIM), elements=finite),
    "v": hnp.arrays(np.float32, (BATCH, KV_LEN, KV_HEADS, DIM), elements=finite),
    "q_lengths": hnp.arrays(np.int32, (BATCH,), elements=st.integers(0, Q_LEN)),
    "kv_lengths": hnp.arrays(np.int32, (BATCH,), elements=st.integers(0, KV_LEN)),
    "mask": hnp.arrays(np.bool_, (Q_LEN, KV_LEN)),
    "causal": st.booleans(),
}


def _check_attention(implementation, mode, x64, q, k, v, q_lengths, kv_lengths, mask, causal):
    call = ATTENTION_CALLS[implementation, causal, mode]
    sink = np.zeros(HEADS, np.float32)
    with strict_settings(x64):
        (value, out), grads = call(q, k, v, sink, mask, q_lengths, kv_lengths)
    assert out.dtype == jnp.float32 and _finite((value, out, grads))
    # Queries past their length attend nothing: exactly 0.
    for b, n in enumerate(q_lengths):
        assert np.all(np.asarray(out)[b, n:] == 0)


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@SETTINGS
@given(**ATTENTION_INPUTS)
def test_attention_and_its_gradients_under_strict_settings(implementation, x64, **inputs):
    _check_attention(implementation, "jit", x64, **inputs)


# Eagerly, the chunked path's loops compile afresh at every call: a few examples only.
@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@settings(deadline=None, max_examples=3)
@given(**ATTENTION_INPUTS)
def test_attention_and_its_gradients_eagerly_under_strict_settings(
    implementation, x64, **inputs
):
    _check_attention(implementation, "eager", x64, **inputs)


def _layers():
    cases = []
    nnx_layers = pytest.importorskip("stablelayers.nnx")
    linen_layers = pytest.importorskip("stablelayers.linen")
    eqx_layers = pytest.importorskip("stablelayers.equinox")
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32))
    mask = jnp.asarray(np.tril(np.ones((5, 5), bool)))
    for name, layer in {
        "Softmax": nnx_layers.Softmax(),
        "LogSoftmax": nnx_layers.LogSoftmax(),
        "Softplus": nnx_layers.Softplus(2.0, learnable=True, rngs=nnx.Rngs(0))
        if _takes_rngs(nnx_layers.Softplus)
        else nnx_layers.Softplus(2.0, learnable=True),
        "MultiHeadAttention": nnx_layers.MultiHeadAttention(
            2, 8, sink=True, decode=False, rngs=nnx.Rngs(0)
        ),
    }.items():
        if name == "MultiHeadAttention":
            cases.append((f"nnx.{name}", lambda layer=layer: layer(x, mask=mask)))
        else:
            cases.append((f"nnx.{name}", lambda layer=layer: layer(x)))
    module = linen_layers.MultiHeadAttention(num_heads=2, sink=True)
    params = module.init(jax.random.key(0), x, x, mask=mask)
    cases.append(("linen.MultiHeadAttention", lambda: module.apply(params, x, x, mask=mask)))
    softplus = linen_layers.Softplus(2.0, learnable=True)
    softplus_params = softplus.init(jax.random.key(0), x)
    cases.append(("linen.Softplus", lambda: softplus.apply(softplus_params, x)))
    attention = eqx_layers.MultiHeadAttention(2, 8, sink=True, key=jax.random.key(0))
    cases.append(("equinox.MultiHeadAttention", lambda: attention(x[0], x[0], x[0], mask)))
    learnable = eqx_layers.Softplus(2.0, learnable=True)
    cases.append(("equinox.Softplus", lambda: learnable(x)))
    return cases


def _takes_rngs(cls):
    import inspect

    return "rngs" in inspect.signature(cls).parameters


@MODES
def test_layers_under_strict_settings(mode, x64):
    for name, call in _layers():
        with strict_settings(x64, mode) as transform:
            y = transform(call)()
        assert y.dtype == jnp.float32 and _finite(y), name


# Under jax_numpy_rank_promotion="raise" (the peers' test setting) attention once raised on
# the chunked path, with lengths, and with a 2-D bias; jax.nn does not.
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True, "local_window_size": (2, 0)},
        {"query_seq_lengths": jnp.array([3, 8]), "key_value_seq_lengths": jnp.array([5, 2])},
        {"bias": jnp.ones((8, 8))},
        {"mask": jnp.ones((8, 8), bool), "sink": jnp.zeros(2)},
    ],
    ids=["plain", "causal-window", "lengths", "2d-bias", "2d-mask-sink"],
)
def test_every_attention_option_runs_under_rank_promotion_raise(implementation, options):
    q, k, v = attention_inputs()
    with jax.numpy_rank_promotion("raise"):
        grads = jax.grad(
            lambda q, k, v: jnp.sum(
                sl.dot_product_attention(
                    q, k, v, implementation=implementation, chunk_size=4, **options
                )
            ),
            argnums=(0, 1, 2),
        )(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)
