"""LMHead layers (NNX, Linen, Equinox): the fused loss of their own projection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stablelayers as sl

WIDTH, VOCAB = 8, 21
HIDDEN = jax.random.normal(jax.random.key(0), (2, 3, WIDTH))
LABELS = jnp.array([[1, 2, -1], [4, 20, 6]])


def _nnx(reduction="none"):
    from flax import nnx

    from stablelayers.nnx import LMHead

    head = LMHead(
        WIDTH, VOCAB, ignore_index=-1, chunk_size=8, reduction=reduction, rngs=nnx.Rngs(0)
    )
    return head(HIDDEN, LABELS), head.logits(HIDDEN), head.kernel[...], head.bias[...]


def _linen(reduction="none"):
    from stablelayers.linen import LMHead

    head = LMHead(VOCAB, ignore_index=-1, chunk_size=8, reduction=reduction)
    params = head.init(jax.random.key(0), HIDDEN, LABELS)
    p = params["params"]
    logits = head.apply(params, HIDDEN, method="logits")
    return head.apply(params, HIDDEN, LABELS), logits, p["kernel"], p["bias"]


def _equinox(reduction="none"):
    from stablelayers.equinox import LMHead

    head = LMHead(
        WIDTH, VOCAB, ignore_index=-1, chunk_size=8, reduction=reduction, key=jax.random.key(0)
    )
    return head(HIDDEN, LABELS), head.logits(HIDDEN), head.weight, head.bias


@pytest.mark.parametrize("make", [_nnx, _linen, _equinox], ids=["nnx", "linen", "equinox"])
def test_lm_head_is_the_fused_loss_of_its_projection(make):
    loss, logits, kernel, bias = make()
    assert kernel.shape == (WIDTH, VOCAB) and logits.shape == (2, 3, VOCAB)
    want = sl.softmax_cross_entropy(logits, LABELS, ignore_index=-1)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert loss[0, 2] == 0.0
    np.testing.assert_allclose(logits, HIDDEN @ kernel + bias[None, None], rtol=1e-6)


@pytest.mark.parametrize("make", [_nnx, _linen, _equinox], ids=["nnx", "linen", "equinox"])
def test_lm_head_mean_is_the_mean_over_counted_tokens(make):
    loss, logits, _, _ = make("mean")
    want = sl.mean_over_valid(
        sl.softmax_cross_entropy(logits, LABELS, ignore_index=-1), LABELS != -1
    )
    assert loss.shape == ()
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_an_option_the_function_does_not_take_fails_when_the_layer_is_built():
    from flax import nnx

    import stablelayers.equinox as sl_eqx
    import stablelayers.nnx as sl_nnx

    with pytest.raises(TypeError, match="label_smothing"):
        sl_nnx.LMHead(WIDTH, VOCAB, label_smothing=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="label_smothing"):
        sl_eqx.LMHead(WIDTH, VOCAB, label_smothing=0.1, key=jax.random.key(0))
