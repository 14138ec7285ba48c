"""optax's own loss tests (optax/losses/_classification_test.py, optax 0.2.8), re-written
against stablelayers.

Each test names the case it ports; cases, shapes and tolerances are optax's. optax's
``softmax_cross_entropy``, ``safe_softmax_cross_entropy`` and
``softmax_cross_entropy_with_integer_labels`` are all ``stablelayers.softmax_cross_entropy``
(probability labels, ``-inf`` logits allowed, integer labels);
``sigmoid_binary_cross_entropy`` is stablelayers'. Where optax's test compares against a
second optax function (poly loss, focal loss, the plain cross-entropy), that function is
the reference. Two adaptations, both documented API: ``axis`` is keyword-only, and
forward-mode checks run inside ``stablelayers.forward_mode()`` (the ops are
``jax.custom_vjp`` by default). optax's tests draw unseeded numbers; here each test seeds.
Every test runs in float32 and under x64, as optax's CI does.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import stablelayers as sl


@pytest.fixture(autouse=True, params=["float32", "x64"])
def precision(request):
    with jax.enable_x64(request.param == "x64"):
        yield request.param


def _rng():
    return np.random.RandomState(0)


# The stablelayers equivalents, under optax's names. Jitted, where optax's tests call some
# eagerly: one compile per case instead of one per primitive keeps the port fast (the
# values are the same; JAX's logsumexp port checks eager against jitted).
_sce = jax.jit(sl.softmax_cross_entropy, static_argnames=("axis",))
softmax_cross_entropy = _sce
safe_softmax_cross_entropy = _sce
softmax_cross_entropy_with_integer_labels = _sce
sigmoid_binary_cross_entropy = jax.jit(sl.sigmoid_binary_cross_entropy)


def _check_grads(f, args, order):
    # Forward mode (check_grads' default modes are fwd and rev) needs forward_mode().
    with sl.forward_mode():
        check_grads(f, args, order=order)


# ---------------------------------------------------------------------------------------
# SoftmaxCrossEntropyTest

YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], dtype=np.float32)
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
EXP = np.array([9.00013, 3.0696733], dtype=np.float32)
MASK = np.array([True, False])
PER_LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]]).astype(bool)


def test_softmax_cross_entropy_scalar():
    out = jax.jit(softmax_cross_entropy)(YS[0], TS[0])
    np.testing.assert_allclose(out, EXP[0], atol=1e-4)


def test_softmax_cross_entropy_batched():
    out = jax.jit(softmax_cross_entropy)(YS, TS)
    np.testing.assert_allclose(out, EXP, atol=1e-4)


def test_softmax_cross_entropy_per_logit_mask():
    out = softmax_cross_entropy(YS, TS, where=PER_LOGIT_MASK)
    # Outputs where all logits are masked are 0.0.
    np.testing.assert_array_equal(jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0)


def test_softmax_cross_entropy_gradient():
    _check_grads(softmax_cross_entropy, (YS[:2], TS[:2]), order=1)


def test_softmax_cross_entropy_gradient_with_mask():
    # The second half of optax's test_gradient: finite gradients under a (batch,) mask.
    def loss_fn(*args, **kw):
        return jnp.sum(softmax_cross_entropy(*args, **kw))

    gs = jax.grad(loss_fn)(YS, labels=TS, where=MASK)
    assert jnp.all(jnp.isfinite(gs))


@pytest.mark.parametrize("size", [5, 10])
def test_softmax_cross_entropy_mask(size):
    rng = _rng()
    preds = rng.normal(size=size)
    targets = rng.dirichlet(np.ones(size))
    mask = rng.randint(2, size=size).astype(bool)
    x = softmax_cross_entropy(preds[mask], targets[mask])
    y = softmax_cross_entropy(preds, targets, where=mask)
    np.testing.assert_allclose(x, y, atol=1e-4)


@pytest.mark.parametrize("shape, axis", [([4, 5, 6], 0), ([4, 5, 6], 1), ([4, 5, 6], 2)])
def test_softmax_cross_entropy_axis(shape, axis):
    rng = _rng()
    preds = rng.normal(size=shape)
    targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    x = softmax_cross_entropy(preds, targets, axis=axis)
    y = softmax_cross_entropy(np.moveaxis(preds, axis, -1), np.moveaxis(targets, axis, -1))
    np.testing.assert_allclose(x, y, atol=1e-4)


# ---------------------------------------------------------------------------------------
# SafeSoftmaxCrossEntropyTest

SAFE_YS = np.array(
    [
        [10.0, 1.0, -2.0],
        [1.0, 4.0, 0.2],
        [-np.inf, 0.0, 0.0],
        [-np.inf, 0.0, 0.0],
        [-np.inf, 0.0, -np.inf],
    ],
    dtype=np.float32,
)
SAFE_TS = np.array(
    [
        [0.0, 1.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.0, 0.5, 0.5],
        [0.4, 0.3, 0.3],
        [0.0, 1.0, 0.0],
    ],
    dtype=np.float32,
)
SAFE_EXP = np.array([9.00013, 3.0696733, 0.693147, np.inf, 0.0], dtype=np.float32)


def test_safe_softmax_cross_entropy_scalar():
    out = jax.jit(safe_softmax_cross_entropy)(SAFE_YS[0], SAFE_TS[0])
    np.testing.assert_allclose(out, SAFE_EXP[0], atol=1e-4)


def test_safe_softmax_cross_entropy_batched():
    out = jax.jit(safe_softmax_cross_entropy)(SAFE_YS, SAFE_TS)
    np.testing.assert_allclose(out, SAFE_EXP, atol=1e-4)


def test_safe_softmax_cross_entropy_gradient():
    _check_grads(safe_softmax_cross_entropy, (SAFE_YS[:2], SAFE_TS[:2]), order=1)


def test_safe_softmax_cross_entropy_against_plain_implementation():
    # The plain implementation, which does not handle -inf, is optax's own.
    plain = jax.value_and_grad(optax.losses.softmax_cross_entropy)(SAFE_YS[0], SAFE_TS[0])
    safe = jax.value_and_grad(safe_softmax_cross_entropy)(SAFE_YS[0], SAFE_TS[0])
    for p, s in zip(plain, safe, strict=True):
        np.testing.assert_allclose(p, s, atol=1e-4)


# ---------------------------------------------------------------------------------------
# SoftmaxCrossEntropyWithIntegerLabelsTest

INT_TS = np.array([1, 0], dtype=np.int32)


def test_integer_labels_consistent_with_softmax_cross_entropy_scalar():
    exp = softmax_cross_entropy(YS[0], jax.nn.one_hot(INT_TS[0], 3))
    out = jax.jit(softmax_cross_entropy_with_integer_labels)(YS[0], INT_TS[0])
    np.testing.assert_allclose(out, exp, rtol=1e-6)


def test_integer_labels_consistent_with_softmax_cross_entropy_batched():
    exp = softmax_cross_entropy(YS, jax.nn.one_hot(INT_TS, 3))
    out = jax.jit(softmax_cross_entropy_with_integer_labels)(YS, INT_TS)
    np.testing.assert_allclose(out, exp, rtol=1e-6)


def test_integer_labels_gradient():
    f = functools.partial(softmax_cross_entropy_with_integer_labels, labels=INT_TS)
    _check_grads(f, (YS,), order=1)


def test_integer_labels_gradient_with_mask():
    def loss_fn(*args, **kw):
        return jnp.sum(softmax_cross_entropy_with_integer_labels(*args, **kw))

    gs = jax.grad(loss_fn)(YS, labels=INT_TS, where=MASK)
    assert jnp.all(jnp.isfinite(gs))


def test_integer_labels_per_logit_mask():
    out = softmax_cross_entropy_with_integer_labels(YS, INT_TS, where=PER_LOGIT_MASK)
    np.testing.assert_array_equal(jnp.where(jnp.any(PER_LOGIT_MASK, -1), 0.0, out), 0)


@pytest.mark.parametrize("shape, axis", [([4, 5, 6], 0), ([4, 5, 6], 1), ([4, 5, 6], 2)])
def test_integer_labels_axis(shape, axis):
    rng = _rng()
    preds = rng.normal(size=shape)
    targets = rng.randint(shape[axis], size=shape[:axis] + shape[axis + 1 :])
    f = softmax_cross_entropy_with_integer_labels
    x = f(preds, targets, axis=axis)
    y = f(np.moveaxis(preds, axis, -1), targets)
    np.testing.assert_allclose(x, y, atol=1e-4)


AXES = [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1), (0, 1, 3), (-4, -3, -1)]


def _axes_cases():
    # Every case in float32; under x64 (int64 labels) two, the rest marked slow.
    return [
        pytest.param(p, axis, marks=[pytest.mark.slow] if slow else [], id=f"{p}-{axis}")
        for p in ["float32", "x64"]
        for axis in AXES
        for slow in [p == "x64" and axis not in [(1, 3), (0, 1, 3)]]
    ]


@pytest.mark.parametrize("precision, axis", _axes_cases(), indirect=["precision"])
def test_integer_labels_axes(precision, axis):
    shape = (2, 3, 4, 5)
    # Canonicalize axis and calculate shapes.
    ndim = len(shape)
    logits_axis = tuple((x + ndim) % ndim for x in axis)
    labels_axis = tuple(x for x in range(ndim) if x not in logits_axis)
    logits_shape = tuple(shape[x] for x in logits_axis)
    labels_shape = tuple(shape[x] for x in labels_axis)
    num_classes = int(np.prod(logits_shape))

    keys = jax.random.split(jax.random.key(42), 2)
    logits = jax.random.uniform(keys[0], (*labels_shape, num_classes))
    labels = jax.random.randint(keys[1], labels_shape, 0, num_classes - 1)

    fn = softmax_cross_entropy_with_integer_labels
    desired = fn(logits, labels)

    # Apply the inverse axes permutation to obtain an array of `shape` shape.
    perm = labels_axis + logits_axis
    perm_inv = tuple(i for i, _ in sorted(enumerate(perm), key=lambda x: x[1]))
    logits = logits.reshape(labels_shape + logits_shape).transpose(perm_inv)
    assert logits.shape == shape
    actual = fn(logits, labels, axis=axis)
    np.testing.assert_allclose(actual, desired)


# ---------------------------------------------------------------------------------------
# SigmoidCrossEntropyTest


@pytest.mark.parametrize(
    "preds, labels, expected",
    [
        ([-1e09, -1e-09], [1.0, 0.0], 5e08),
        ([-1e09, -1e-09], [0.0, 1.0], 0.3465736),
        ([1e09, 1e-09], [1.0, 0.0], 0.3465736),
        ([1e09, 1e-09], [0.0, 1.0], 5e08),
        ([-1e09, 1e-09], [1.0, 0.0], 5e08),
        ([-1e09, 1e-09], [0.0, 1.0], 0.3465736),
        ([1e09, -1e-09], [1.0, 0.0], 0.3465736),
        ([1e09, -1e-09], [0.0, 1.0], 5e08),
        ([0.0, 0.0], [1.0, 0.0], 0.6931472),
        ([0.0, 0.0], [0.0, 1.0], 0.6931472),
    ],
)
def test_sigmoid_cross_entropy(preds, labels, expected):
    tested = jnp.mean(sigmoid_binary_cross_entropy(np.array(preds), np.array(labels)))
    np.testing.assert_allclose(tested, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# PolyLossTest.test_equals_to_cross_entropy_when_eps0: optax's poly loss is the reference.


@pytest.mark.parametrize(
    "logits, labels",
    [
        (
            [[4.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.134, 1.234, 3.235]],
            [[1.0, 0.0, 0.0], [0.0, 0.8, 0.2], [0.34, 0.33, 0.33]],
        ),
        ([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]], [[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]]),
        (
            [[4.0, 2.0, 1.0, 0.134, 1.3515], [0.0, 5.0, 1.0, 0.5215, 5.616]],
            [[0.5, 0.0, 0.0, 0.0, 0.5], [0.0, 0.12, 0.2, 0.56, 0.12]],
        ),
        ([1.89, 2.39], [0.34, 0.66]),
        ([0.314], [1.0]),
    ],
)
def test_poly_loss_equals_to_cross_entropy_when_eps0(logits, labels):
    logits, labels = np.array(logits), np.array(labels)
    np.testing.assert_allclose(
        jax.jit(optax.losses.poly_loss_cross_entropy)(logits, labels, epsilon=0.0),
        jax.jit(softmax_cross_entropy)(logits, labels),
        atol=1e-4,
    )


# ---------------------------------------------------------------------------------------
# SigmoidFocalLossTest, the cases with sigmoid_binary_cross_entropy as the expected value:
# optax's focal loss is the reference.

FOCAL_YS = np.array([[2.0, 0.1, -2.0], [0.3, -0.1, 1.2]], dtype=np.float32)
FOCAL_TS = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
FOCAL_RTOL = 5e-3 if jax.default_backend() != "cpu" else 2e-5


def test_focal_equals_ce():
    np.testing.assert_allclose(
        jax.jit(optax.losses.sigmoid_focal_loss)(FOCAL_YS, FOCAL_TS, gamma=0.0),
        sigmoid_binary_cross_entropy(FOCAL_YS, FOCAL_TS),
        rtol=FOCAL_RTOL,
    )


def test_focal_gamma_zero_matches_binary_cross_entropy():
    test_logits = jnp.array([[-1.0, 0.0, 1.0], [2.0, -2.0, 0.5]])
    test_labels = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        jax.jit(optax.losses.sigmoid_focal_loss)(test_logits, test_labels, gamma=0.0),
        sigmoid_binary_cross_entropy(test_logits, test_labels),
        rtol=FOCAL_RTOL,
    )


def test_focal_alpha_one():
    np.testing.assert_allclose(
        jax.jit(optax.losses.sigmoid_focal_loss)(FOCAL_YS, FOCAL_TS, gamma=0.0, alpha=1),
        sigmoid_binary_cross_entropy(FOCAL_YS, FOCAL_TS) * FOCAL_TS,
        rtol=FOCAL_RTOL,
    )
