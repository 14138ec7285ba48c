"""Each op keeps exactly one array the size of x for its backward pass."""

import jax
import jax.numpy as jnp
import pytest

import stablelayers as sl

SHAPE = (64, 256)


def _residual_arrays(f, *args):
    _, vjp_fn = jax.vjp(f, *args)
    return [leaf for leaf in jax.tree_util.tree_leaves(vjp_fn) if hasattr(leaf, "nbytes")]


def _full_size(leaves, x):
    return [leaf for leaf in leaves if leaf.size >= x.size]


CASES = {
    "softmax": lambda x: sl.softmax(x),
    "softmax_where": lambda x: sl.softmax(x, where=jnp.ones(SHAPE, bool)),
    "log_softmax": lambda x: sl.log_softmax(x),
    "log_softmax_where": lambda x: sl.log_softmax(x, where=jnp.arange(256) < 100),
    "masked_softmax": lambda x: sl.masked_softmax(x),
    "masked_softmax_sink": lambda x: sl.masked_softmax(x, sink=jnp.zeros(64)),
    "softplus": lambda x: sl.softplus(x),
    "softplus_beta_array": lambda x: sl.softplus(x, jnp.float32(2.0)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_exactly_one_x_sized_residual(name, dtype):
    x = jax.random.normal(jax.random.key(0), SHAPE, dtype)
    leaves = _residual_arrays(CASES[name], x)
    full = _full_size(leaves, x)
    assert len(full) == 1, [(leaf.shape, leaf.dtype) for leaf in leaves]
    assert full[0].nbytes == x.nbytes
    small = sum(leaf.nbytes for leaf in leaves) - x.nbytes
    # At most three numbers per row (log_softmax: the max and the total as a float pair).
    assert small <= 64 * 4 * 3, "per-row extras only"


def test_jax_nn_softplus_keeps_two_arrays_for_comparison():
    x = jnp.ones(SHAPE)
    assert len(_full_size(_residual_arrays(jax.nn.softplus, x), x)) == 2


def test_sink_gradient_keeps_only_a_row_sized_extra():
    x = jnp.ones(SHAPE)
    leaves = _residual_arrays(lambda x, s: sl.masked_softmax(x, sink=s), x, jnp.zeros(64))
    assert sum(leaf.nbytes for leaf in leaves) <= x.nbytes + 2 * 64 * 4
