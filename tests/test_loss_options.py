"""label_smoothing and z_loss traced (jitted, scheduled, differentiated) on every loss:
checked when concrete, taken as they are when traced, and the loss differentiable in them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import stablelayers as sl

REDUCE = {"none": lambda l: l, "mean": jnp.mean, "sum": jnp.sum}


def _data(dtype=np.float32):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(6, 5)).astype(dtype)
    weight = rng.normal(size=(5, 7)).astype(dtype)
    labels = np.array([0, 3, 6, 2, 2, 1])
    return hidden, weight, labels


def _materialised(hidden, weight, labels, eps, z, reduction="none"):
    loss = sl.softmax_cross_entropy(hidden @ weight, labels, label_smoothing=eps, z_loss=z)
    return REDUCE[reduction](loss)


def test_jitted_options_equal_concrete_ones():
    hidden, weight, labels = _data()
    logits = hidden @ weight
    probs = np.asarray(jax.nn.softmax(logits * 0.3))
    for target in (labels, probs):
        concrete = sl.softmax_cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-3)
        traced = jax.jit(
            lambda e, z, t=target: sl.softmax_cross_entropy(
                logits, t, label_smoothing=e, z_loss=z
            )
        )(0.1, 1e-3)
        np.testing.assert_allclose(traced, concrete, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("forward", [False, True])
def test_fused_loss_takes_traced_options(reduction, forward):
    hidden, weight, labels = _data()

    def fused(eps, z):
        return sl.linear_softmax_cross_entropy(
            hidden,
            weight,
            labels,
            label_smoothing=eps,
            z_loss=z,
            reduction=reduction,
            chunk_size=3,
        )

    with sl.forward_mode() if forward else jax.named_scope("reverse"):
        traced = jax.jit(fused)(0.2, 1e-2)
    expected = _materialised(hidden, weight, labels, 0.2, 1e-2, reduction)
    np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-6)


def test_options_from_an_optax_style_schedule_under_jit():
    hidden, weight, labels = _data()

    @jax.jit
    def step(count):
        eps = 0.2 * jnp.minimum(count / 10.0, 1.0)  # a warm-up schedule, traced
        return sl.linear_softmax_cross_entropy(
            hidden, weight, labels, label_smoothing=eps, reduction="mean"
        )

    np.testing.assert_allclose(
        step(5), _materialised(hidden, weight, labels, 0.1, 0.0, "mean"), rtol=1e-6
    )


def test_gradients_in_the_options_against_finite_differences(x64):
    hidden, weight, labels = _data(np.float64)
    logits = hidden @ weight

    def plain(e, z):
        return jnp.sum(sl.softmax_cross_entropy(logits, labels, label_smoothing=e, z_loss=z))

    check_grads(jax.jit(plain), (0.1, 1e-2), order=2, modes=["rev", "fwd"], eps=1e-4)
    for reduction in ("none", "mean", "sum"):

        def fused(e, z, reduction=reduction):
            return jnp.sum(
                sl.linear_softmax_cross_entropy(
                    hidden,
                    weight,
                    labels,
                    label_smoothing=e,
                    z_loss=z,
                    reduction=reduction,
                    chunk_size=3,
                )
            )

        if reduction != "mean":  # the mean is the sum scaled: the equality below covers it
            check_grads(jax.jit(fused), (0.1, 1e-2), order=1, modes=["rev"], eps=1e-4)
            with sl.forward_mode():
                check_grads(jax.jit(fused), (0.1, 1e-2), order=1, modes=["fwd"], eps=1e-4)
        # d loss / d eps and d loss / d z equal the materialised loss's.
        expected = jax.grad(
            lambda e, z, r=reduction: jnp.sum(_materialised(hidden, weight, labels, e, z, r)),
            argnums=(0, 1),
        )(0.1, 1e-2)
        np.testing.assert_allclose(
            jax.jit(jax.grad(fused, argnums=(0, 1)))(0.1, 1e-2), expected, rtol=1e-12
        )


def test_options_under_vmap():
    hidden, weight, labels = _data()
    eps = jnp.array([0.0, 0.1, 0.3])
    batched = jax.vmap(
        lambda e: sl.linear_softmax_cross_entropy(
            hidden, weight, labels, label_smoothing=e, reduction="sum"
        )
    )(eps)
    expected = [_materialised(hidden, weight, labels, float(e), 0.0, "sum") for e in eps]
    np.testing.assert_allclose(batched, expected, rtol=1e-5)


def test_concrete_options_are_still_checked_and_traced_ones_must_be_scalars():
    logits, labels = jnp.zeros((2, 3)), jnp.array([0, 1])
    with pytest.raises(ValueError, match="label_smoothing"):
        sl.softmax_cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        sl.softmax_cross_entropy(logits, labels, z_loss=-1.0)
    with pytest.raises(TypeError, match="real scalar"):
        jax.jit(lambda e: sl.softmax_cross_entropy(logits, labels, label_smoothing=e))(
            jnp.zeros(2)
        )
