"""``jax.debug_nans`` and ``jax.debug_infs`` never trip on finite input, eager (every
intermediate checked, under ``jax.disable_jit()``) or jitted, value and gradient; they do
trip where the answer itself is NaN (an out-of-range label)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _edge_inputs import attention_inputs

import stablelayers as sl

X = np.array([[1.0, 2.0, -0.5], [0.3, 0.1, 0.2]], np.float32)
LABELS = np.array([0, 2])
PROBS = np.asarray(jax.nn.softmax(X))
KEEP = np.array([True, True, False])
H, W = np.ones((2, 4), np.float32), np.full((4, 3), 0.1, np.float32)

OPS = {
    "logsumexp": lambda x: sl.logsumexp(x),
    "logsumexp_scalar": lambda x: sl.logsumexp(x[0, 0]),
    "logsumexp_b": lambda x: sl.logsumexp(x, axis=-1, b=np.array([1.0, -0.5, 2.0])).sum(),
    "logsumexp_where": lambda x: sl.logsumexp(x, axis=-1, where=KEEP).sum(),
    "softmax": lambda x: (sl.softmax(x) ** 2).sum(),
    "softmax_where": lambda x: (sl.softmax(x, where=KEEP) ** 2).sum(),
    "log_softmax": lambda x: (sl.log_softmax(x) ** 2).sum(),
    "softplus": lambda x: sl.softplus(x).sum(),
    "sigmoid": lambda x: sl.sigmoid(x).sum(),
    "log_sigmoid": lambda x: sl.log_sigmoid(x).sum(),
    "sigmoid_bce": lambda x: sl.sigmoid_binary_cross_entropy(x, PROBS).sum(),
    "cross_entropy": lambda x: sl.softmax_cross_entropy(x, LABELS).sum(),
    "cross_entropy_probs": lambda x: sl.softmax_cross_entropy(x, PROBS).sum(),
    "cross_entropy_options": lambda x: sl.softmax_cross_entropy(
        x, LABELS, label_smoothing=0.1, z_loss=1e-3, ignore_index=2, where=KEEP
    ).sum(),
    "fused_loss": lambda x: sl.linear_softmax_cross_entropy(H, W * x[0, 0], LABELS).sum(),
    "fused_loss_mean": lambda x: sl.linear_softmax_cross_entropy(
        H, W * x[0, 0], LABELS, reduction="mean", label_smoothing=0.1
    ),
    "attention": lambda x: sl.dot_product_attention(
        x[None, :, None, :], x[None, :, None, :], x[None, :, None, :], is_causal=True
    ).sum(),
}


@pytest.mark.parametrize("flag", [jax.debug_nans, jax.debug_infs])
@pytest.mark.parametrize("name", sorted(OPS))
def test_no_error_on_finite_input(name, flag):
    f = OPS[name]
    with flag(True):
        with jax.disable_jit():
            f(X)
            jax.grad(f)(X)
        jax.jit(jax.grad(f))(X)


def test_nan_check_trips_on_the_nan_an_out_of_range_label_gives():
    with jax.debug_nans(True), pytest.raises(FloatingPointError):
        jax.jit(sl.softmax_cross_entropy)(X, np.array([0, 3]))


# Masked attention and plain softmax on the pure-JAX path once raised FloatingPointError in
# eager mode (masked logits became -inf inside).
_ROW_CALLS = {
    "softmax": lambda x, m: sl.softmax(x),
    "softmax-where": lambda x, m: sl.softmax(x, where=m),
    "log_softmax": lambda x, m: sl.log_softmax(x),
    "masked_softmax-sink": lambda x, m: sl.masked_softmax(x, where=m, sink=jnp.zeros(2)),
    "softmax-where-grad": lambda x, m: jax.grad(lambda x: jnp.sum(sl.softmax(x, where=m) * x))(
        x
    ),
    "softplus": lambda x, m: sl.softplus(x, 2.0),
}


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("name", sorted(_ROW_CALLS))
def test_ops_with_empty_rows_run_under_debug_infs_and_debug_nans(name, mode):
    x = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    m = jnp.array([[True, False, True], [False, False, False]])
    call = _ROW_CALLS[name]
    call = call if mode == "eager" else jax.jit(call)
    with jax.debug_infs(True), jax.debug_nans(True):
        assert np.all(np.isfinite(call(x, m)))


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_masked_attention_runs_under_debug_infs(implementation, mode):
    q, k, v = attention_inputs()

    def loss(q, k, v):
        out = sl.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            key_value_seq_lengths=jnp.array([5, 3]),
            query_seq_lengths=jnp.array([8, 6]),
            implementation=implementation,
            chunk_size=4,
        )
        return jnp.sum(out * out)

    call = jax.value_and_grad(loss, argnums=(0, 1, 2))
    call = call if mode == "eager" else jax.jit(call)
    with jax.debug_infs(True), jax.debug_nans(True):
        value, grads = call(q, k, v)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
