"""Bad input fails at trace time with a message that says what is wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablelayers as sl

X = jnp.zeros((2, 3, 4))
MASKED_OPS = [sl.softmax, sl.log_softmax, sl.masked_softmax]


@pytest.mark.parametrize("op", MASKED_OPS)
def test_mask_that_does_not_broadcast_names_both_shapes(op):
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(2, 3, 4\)"):
        op(X, where=jnp.ones((3, 5), bool))
    with pytest.raises(ValueError, match="broadcast"):
        op(X, where=jnp.ones((1, 2, 3, 4), bool))


@pytest.mark.parametrize("op", MASKED_OPS)
@pytest.mark.parametrize("bad", [jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4), jnp.int32)])
def test_non_boolean_where(op, bad):
    with pytest.raises(TypeError, match="boolean"):
        op(X, where=bad)


@pytest.mark.parametrize("op", MASKED_OPS)
@pytest.mark.parametrize("axis", [3, -4, (0, 5), 1.5, (1, 1), (1, -2)])
def test_bad_axis(op, axis):
    with pytest.raises((ValueError, TypeError), match="axis"):
        op(X, axis=axis)


@pytest.mark.parametrize("op", MASKED_OPS)
def test_errors_are_raised_at_trace_time(op):
    with pytest.raises(ValueError):
        jax.jit(lambda x: op(x, axis=7)).lower(X)
    with pytest.raises(TypeError):
        jax.eval_shape(lambda x: op(x, where=x), X)


def test_sink_that_does_not_broadcast():
    with pytest.raises(ValueError, match=r"sink.*\(5,\).*\(2, 3\)"):
        sl.masked_softmax(X, sink=jnp.zeros(5))


def test_bad_initial():
    with pytest.raises(ValueError, match="initial"):
        sl.softmax(X, initial=jnp.zeros(5))
    with pytest.raises(TypeError, match="initial"):
        sl.softmax(X, initial=jnp.ones((), bool))


@pytest.mark.parametrize("beta", [0.0, -1.0, jnp.array([1.0, -2.0])])
def test_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        sl.softplus(jnp.zeros(2), beta)


def test_beta_that_does_not_broadcast():
    with pytest.raises(ValueError, match="beta"):
        sl.softplus(jnp.zeros(3), jnp.ones(2))


def test_complex_input():
    with pytest.raises(TypeError, match="real"):
        sl.softmax(jnp.zeros(3, jnp.complex64))


@pytest.mark.parametrize("op", [*MASKED_OPS, sl.softplus])
def test_empty_axis_returns_empty(op):
    x = jnp.zeros((3, 0))
    y = op(x) if op is sl.softplus else op(x, axis=-1)
    assert y.shape == (3, 0)
    g = jax.grad(lambda x: jnp.sum(op(x)))(x)
    assert g.shape == (3, 0)


def test_transposed_weight_message_names_the_shapes_and_the_fix():
    hidden = jnp.ones((4, 8))
    with pytest.raises(ValueError) as info:
        sl.linear_softmax_cross_entropy(hidden, jnp.ones((32, 8)), jnp.zeros(4, jnp.int32))
    message = str(info.value)
    assert "(hidden, vocab) = (8, vocab)" in message and "got (32, 8)" in message
    assert "weight.T" in message and "((8,)" not in message


# An infinite beta was once accepted and gave NaN.
@pytest.mark.parametrize(
    "beta", [float("inf"), np.float32(np.inf), jnp.inf, np.float64(-1.0), jnp.float32(0.0)]
)
def test_non_finite_or_non_positive_beta_is_rejected(beta):
    with pytest.raises(ValueError, match="positive and finite"):
        sl.softplus(jnp.linspace(-3.0, 3.0, 7, dtype=jnp.float32), beta)
