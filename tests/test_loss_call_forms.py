"""The call forms optax accepts (several class axes with integer labels, a per-example
``where``) and the one rule for labels out of range: NaN, never a number."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import stablelayers as sl


def _logits(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- several class axes ---------------------------------------------------------------


@pytest.mark.parametrize("axis", [(2, 3), (3, 2), (-1, -2), (1, 3)])
def test_tuple_axis_integer_labels_as_optax(axis):
    logits = _logits((2, 3, 4, 5))
    rows = tuple(n for i, n in enumerate(logits.shape) if i % 4 not in {a % 4 for a in axis})
    classes = int(np.prod([logits.shape[a] for a in axis]))
    labels = np.random.default_rng(1).integers(0, classes, size=rows)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis=axis)
    got = sl.softmax_cross_entropy(logits, labels, axis=axis)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda x: sl.softmax_cross_entropy(x, labels, axis=axis).sum())(logits)
    expected_grad = jax.grad(
        lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis).sum()
    )(logits)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_tuple_axis_documented_example_and_probability_labels():
    # optax's docstring example: a label is a flat index into the class axes.
    logits = jnp.arange(24, dtype=jnp.float32).reshape(1, 2, 3, 4)
    labels = jnp.ravel_multi_index((jnp.array([[1, 2]]), jnp.array([[1, 3]])), (3, 4))
    np.testing.assert_allclose(
        sl.softmax_cross_entropy(logits, labels, axis=(2, 3)), [[6.4587, 0.4587]], atol=1e-4
    )
    probs = np.asarray(jax.nn.softmax(_logits((2, 3, 4), 2), axis=(1, 2)))
    x = _logits((2, 3, 4))
    np.testing.assert_allclose(
        sl.softmax_cross_entropy(x, probs, axis=(1, 2)),
        optax.softmax_cross_entropy(x, probs, axis=(1, 2)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        sl.softmax_cross_entropy(x, probs, axis=None),
        optax.softmax_cross_entropy(x, probs, axis=None),
        rtol=1e-6,
    )


def test_tuple_axis_with_smoothing_equals_the_flattened_loss():
    x = _logits((2, 3, 4))
    labels = np.array([5, 11])
    flat = sl.softmax_cross_entropy(x.reshape(2, 12), labels, label_smoothing=0.1)
    np.testing.assert_allclose(
        sl.softmax_cross_entropy(x, labels, axis=(1, 2), label_smoothing=0.1), flat, rtol=1e-6
    )


# --- a per-example where --------------------------------------------------------------


def test_per_example_where_as_optax():
    x = _logits((4, 4))  # square: the mask of the examples' shape masks examples
    labels = np.array([0, 1, 2, 3])
    where = np.array([True, False, True, False])
    expected = optax.softmax_cross_entropy_with_integer_labels(x, labels, where=where)
    got = sl.softmax_cross_entropy(x, labels, where=where)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_array_equal(got[~where], 0.0)
    probs = np.asarray(jax.nn.softmax(x))
    np.testing.assert_allclose(
        sl.softmax_cross_entropy(x, probs, where=where),
        optax.softmax_cross_entropy(x, probs, where=where),
        rtol=1e-6,
    )
    grad = jax.grad(lambda x: sl.softmax_cross_entropy(x, labels, where=where).sum())(x)
    np.testing.assert_array_equal(grad[~where], 0.0)


def test_per_example_where_on_a_batch_of_sequences_and_a_class_mask_still_broadcasts():
    x = _logits((2, 3, 5))
    labels = np.zeros((2, 3), int)
    where = np.array([[True, True, False], [True, False, False]])
    got = sl.softmax_cross_entropy(x, labels, where=where)
    np.testing.assert_allclose(got[where], sl.softmax_cross_entropy(x, labels)[where])
    np.testing.assert_array_equal(got[~where], 0.0)
    classes = np.array([True, True, True, False, False])  # (classes,): not the rows' shape
    np.testing.assert_allclose(
        sl.softmax_cross_entropy(x, labels, where=classes),
        sl.softmax_cross_entropy(x[..., :3], labels),
        rtol=1e-6,
    )


# --- labels out of range --------------------------------------------------------------


BAD = np.array([0, 4, -100, 1])  # 4 == classes, -100 with no ignore_index


def test_out_of_range_labels_give_nan_loss_and_gradient_never_a_number():
    x = _logits((4, 4))
    loss = np.asarray(sl.softmax_cross_entropy(x, BAD))
    assert np.isnan(loss[1]) and np.isnan(loss[2])
    good = np.asarray(sl.softmax_cross_entropy(x, np.array([0, 0, 0, 1])))
    np.testing.assert_array_equal(loss[[0, 3]], good[[0, 3]])
    assert np.isnan(sl.mean_over_valid(loss, np.ones(4, bool)))
    grad = np.asarray(jax.grad(lambda x: sl.softmax_cross_entropy(x, BAD).sum())(x))
    assert np.isnan(grad[[1, 2]]).all() and np.isfinite(grad[[0, 3]]).all()
    ignored = sl.softmax_cross_entropy(x, BAD, ignore_index=-100)
    assert np.isnan(ignored[1]) and ignored[2] == 0.0
    # A row masked out entirely is padding: its label is never read.
    masked = np.asarray(
        sl.softmax_cross_entropy(x, BAD, where=np.array([True, False, False, True]))
    )
    np.testing.assert_array_equal(masked[[1, 2]], 0.0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_fused_loss_out_of_range_labels_give_nan(reduction):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(4, 3)).astype(np.float32)
    weight = rng.normal(size=(3, 4)).astype(np.float32)

    def loss(h, labels, **kw):
        return sl.linear_softmax_cross_entropy(h, weight, labels, reduction=reduction, **kw)

    out = np.asarray(loss(hidden, BAD))
    grad = np.asarray(jax.grad(lambda h: jnp.sum(loss(h, BAD)))(hidden))
    if reduction == "none":
        assert np.isnan(out[[1, 2]]).all() and np.isfinite(out[[0, 3]]).all()
        assert np.isnan(grad[[1, 2]]).all() and np.isfinite(grad[[0, 3]]).all()
    else:
        assert np.isnan(out) and np.isnan(grad).all()
    ignored = loss(hidden, BAD, ignore_index=-100)
    assert np.isnan(ignored).any()
    fine = loss(hidden, np.array([0, 3, -100, 1]), ignore_index=-100)
    assert np.isfinite(fine).all()


def test_checkify_reports_an_out_of_range_label():
    x = _logits((4, 4))

    def losses(x, labels):
        return sl.softmax_cross_entropy(x, labels, ignore_index=-100).sum()

    checked = jax.jit(checkify.checkify(losses))
    err, _ = checked(x, BAD)
    with pytest.raises(checkify.JaxRuntimeError, match=r"outside \[0, 4\)"):
        err.throw()
    err, _ = checked(x, np.array([0, 3, -100, 1]))
    assert err.get() is None
    fused = checkify.checkify(
        lambda h, labels: sl.linear_softmax_cross_entropy(
            h, np.eye(4, dtype=np.float32), labels
        )
    )
    err, _ = fused(x, BAD)
    with pytest.raises(checkify.JaxRuntimeError, match="linear_softmax_cross_entropy"):
        err.throw()


# --- one argument vocabulary: axis and where in optax's places, reduction everywhere ---


def test_axis_and_where_positional_as_optax():
    x = _logits((3, 5, 4))
    labels = np.array([[0, 3, 1, 4], [2, 2, 0, 1], [4, 1, 3, 0]])
    where = np.array([[True, False, True, True]] * 3)
    got = sl.softmax_cross_entropy(x, labels, 1, where)
    np.testing.assert_array_equal(got, sl.softmax_cross_entropy(x, labels, axis=1, where=where))
    for axis in ([1], (1,), np.int64(1), -2):  # as the softmax family takes it
        np.testing.assert_array_equal(got, sl.softmax_cross_entropy(x, labels, axis, where))
    expected = optax.softmax_cross_entropy_with_integer_labels(x, labels, 1, where)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    loss = sl.sigmoid_binary_cross_entropy(x, x > 0, x < 1)
    np.testing.assert_allclose(
        sl.mean_over_valid(loss, where=x < 1), sl.mean_over_valid(loss, x < 1)
    )


def test_reduction_means_the_same_in_every_loss():
    x = _logits((6, 5))
    labels = np.array([0, -1, 4, 2, -1, 3])
    rows = np.array([True, True, True, False, True, True])
    kw = {"ignore_index": -1, "label_smoothing": 0.1, "z_loss": 1e-2}
    per_example = sl.softmax_cross_entropy(x, labels, where=rows, **kw)
    counted = (labels != -1) & rows
    mean = sl.softmax_cross_entropy(x, labels, where=rows, reduction="mean", **kw)
    np.testing.assert_allclose(mean, sl.mean_over_valid(per_example, counted), rtol=1e-6)
    total = sl.softmax_cross_entropy(x, labels, where=rows, reduction="sum", **kw)
    np.testing.assert_allclose(total, jnp.sum(per_example), rtol=1e-6)
    t, keep = x > 0, x < 1
    entries = sl.sigmoid_binary_cross_entropy(x, t, keep)
    got = sl.sigmoid_binary_cross_entropy(x, t, keep, reduction="mean")
    np.testing.assert_allclose(got, sl.mean_over_valid(entries, keep), rtol=1e-6)
    got = sl.sigmoid_binary_cross_entropy(x, t, reduction="sum")
    np.testing.assert_allclose(got, jnp.sum(sl.sigmoid_binary_cross_entropy(x, t)), rtol=1e-6)
    # A batch of padding only: mean 0 with gradient 0 (as the fused loss's).
    ignored = np.full(6, -1)
    value, grad = jax.value_and_grad(
        lambda x: sl.softmax_cross_entropy(x, ignored, ignore_index=-1, reduction="mean")
    )(x)
    assert value == 0.0 and not np.any(grad)
    for loss in (
        lambda r: sl.softmax_cross_entropy(x, labels, reduction=r),
        lambda r: sl.sigmoid_binary_cross_entropy(x, t, reduction=r),
        lambda r: sl.linear_softmax_cross_entropy(x, x.T, labels[:5].clip(0), reduction=r),
    ):
        with pytest.raises(ValueError, match="'none', 'mean' or 'sum'"):
            loss("max")


def test_the_fused_class_mask_is_vocab_mask_not_where():
    h, w, labels = _logits((4, 3)), _logits((3, 5), seed=1), np.array([0, 4, 1, 3])
    mask = np.array([True, True, False, True, True])
    got = sl.linear_softmax_cross_entropy(h, w, labels, vocab_mask=mask)
    want = sl.softmax_cross_entropy(h @ w, labels, where=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="`vocab_mask` must be a boolean"):
        sl.linear_softmax_cross_entropy(h, w, labels, vocab_mask=mask.astype(int))
    with pytest.raises(TypeError, match="where"):
        sl.linear_softmax_cross_entropy(h, w, labels, where=mask)
