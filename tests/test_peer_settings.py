"""Every public function and layer under the settings the peers test with: float64 on
(``jax_enable_x64``), implicit rank promotion an error, and ``jax.debug_infs`` /
``jax.debug_nans`` (eager and jit) for inputs whose math needs no inf or NaN. Hypothesis
draws the inputs; each property also holds with every setting off (the rest of the suite).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablelayers as sl

# Few examples: every new shape compiles afresh under each setting, on two cores.
SETTINGS = settings(deadline=None, max_examples=6)
# jit mode checks the compiled program's outputs for inf and NaN, with float64 on, where
# each op must keep float32 inputs in float32; eager mode checks every primitive's output,
# which compiles each primitive on its own: minutes for these sweeps, so it runs with the
# slow tests (test_probe_defects.py runs each op eagerly on fixed inputs by default).
MODES = pytest.mark.parametrize(
    ("mode", "x64"), [("jit", True), pytest.param("eager", False, marks=pytest.mark.slow)]
)
finite = st.floats(-30.0, 30.0, width=32)
shapes = hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5)


@contextlib.contextmanager
def peer_settings(x64, mode):
    """x64 on or off, rank promotion 'raise', debug_infs and debug_nans on."""
    with (
        jax.enable_x64(x64),
        jax.numpy_rank_promotion("raise"),
        jax.debug_infs(True),
        jax.debug_nans(True),
    ):
        yield (lambda f: f) if mode == "eager" else jax.jit


@st.composite
def logits_and_mask(draw):
    shape = draw(shapes)
    x = draw(hnp.arrays(np.float32, shape, elements=finite))
    mask = draw(hnp.arrays(np.bool_, shape))
    return x, mask


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


@MODES
@pytest.mark.parametrize("name", sorted(ROW_OPS))
@SETTINGS
@given(case=logits_and_mask())
def test_row_ops_and_their_gradients_under_peer_settings(name, mode, x64, case):
    x, mask = case
    op = ROW_OPS[name]

    def loss(x):
        y = op(x, mask)
        return jnp.sum(jnp.where(jnp.isfinite(y), y, 0.0) * jnp.cos(x))

    with peer_settings(x64, mode) as transform:
        y = transform(op)(x, mask)
        grad = transform(jax.grad(loss))(x)
    assert y.dtype == jnp.float32 and grad.dtype == jnp.float32
    if name == "softmax":
        np.testing.assert_array_equal(np.asarray(y)[~mask], 0.0)
        np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
    else:
        assert _finite(y)
    assert _finite(grad)


@st.composite
def attention_case(draw):
    batch, q_len, kv_len = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 6)),
    )
    heads, kv_heads = draw(st.sampled_from([(2, 2), (2, 1)]))
    q = draw(hnp.arrays(np.float32, (batch, q_len, heads, 4), elements=finite))
    k = draw(hnp.arrays(np.float32, (batch, kv_len, kv_heads, 4), elements=finite))
    v = draw(hnp.arrays(np.float32, (batch, kv_len, kv_heads, 4), elements=finite))
    q_lengths = draw(hnp.arrays(np.int32, (batch,), elements=st.integers(0, q_len)))
    kv_lengths = draw(hnp.arrays(np.int32, (batch,), elements=st.integers(0, kv_len)))
    mask = draw(hnp.arrays(np.bool_, (q_len, kv_len)))
    return q, k, v, q_lengths, kv_lengths, mask


@MODES
@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@SETTINGS
@given(case=attention_case(), causal=st.booleans())
def test_attention_and_its_gradients_under_peer_settings(
    implementation, mode, x64, case, causal
):
    q, k, v, q_lengths, kv_lengths, mask = case

    def loss(q, k, v, sink):
        out = sl.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            sink=sink,
            is_causal=causal,
            query_lengths=q_lengths,
            key_lengths=kv_lengths,
            implementation=implementation,
            chunk_size=2,
        )
        return jnp.sum(out * out), out

    sink = jnp.zeros(q.shape[-2], jnp.float32)
    with peer_settings(x64, mode) as transform:
        (value, out), grads = transform(
            jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        )(q, k, v, sink)
    assert out.dtype == jnp.float32 and _finite((value, out, grads))
    # Queries past their length attend nothing: exactly 0.
    for b, n in enumerate(q_lengths):
        assert np.all(np.asarray(out)[b, n:] == 0)


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
def test_layers_under_peer_settings(mode, x64):
    for name, call in _layers():
        with peer_settings(x64, mode) as transform:
            y = transform(call)()
        assert y.dtype == jnp.float32 and _finite(y), name
