"""Property tests: invariants that must hold for every input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablelayers as sl

# 15 examples a test: each new shape compiles afresh, and CI runs on two cores within 20
# minutes; `HYPOTHESIS_PROFILE=thorough` runs 200.
settings.register_profile("stablelayers", deadline=None, max_examples=15)
settings.register_profile("thorough", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "stablelayers"))

shapes = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6)
any_float = st.floats(width=32, allow_nan=True, allow_infinity=True)
finite_float = st.floats(-1e4, 1e4, width=32)
# Multiples of 1/64: adding an integer shift below 2**10 is exact in float32.
grid_float = st.integers(-4096, 4096).map(lambda k: k / 64)


@st.composite
def logits_and_mask(draw, elements=any_float):
    shape = draw(shapes)
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    mask = draw(hnp.arrays(np.bool_, shape))
    return x, mask


def _row_has_unmasked_nan(x, mask):
    return np.any(np.isnan(x) & mask, axis=-1)


@given(logits_and_mask(finite_float))
def test_rows_sum_to_one(case):
    x, mask = case
    live = mask.any(-1)
    for op in (sl.softmax, sl.masked_softmax):
        total = np.asarray(op(x, where=mask), np.float64).sum(-1)
        np.testing.assert_allclose(total[live], 1.0, rtol=1e-5)
        np.testing.assert_array_equal(total[~live], 0.0)
    lse_total = np.exp(np.asarray(sl.log_softmax(x, where=mask), np.float64)).sum(-1)
    np.testing.assert_allclose(lse_total[live], 1.0, rtol=1e-5)


@given(hnp.arrays(np.float32, shapes, elements=grid_float), st.integers(-1000, 1000))
def test_shift_invariance(x, shift):
    shifted = x + np.float32(shift)
    for op in (sl.softmax, sl.log_softmax, sl.masked_softmax):
        np.testing.assert_allclose(op(shifted), op(x), rtol=1e-6, atol=1e-7)


@given(logits_and_mask())
def test_masked_entries_exact_and_no_nan_leaks(case):
    x, mask = case
    tainted = _row_has_unmasked_nan(x, mask)
    for op, fill in ((sl.softmax, 0.0), (sl.masked_softmax, 0.0), (sl.log_softmax, -np.inf)):
        y = np.asarray(op(x, where=mask))
        np.testing.assert_array_equal(y[~mask], fill)
        assert not np.any(np.isnan(y[~tainted])), (x, mask)


@given(logits_and_mask(), hnp.arrays(np.float32, (6,), elements=finite_float))
def test_gradients_zero_in_masked_places_and_finite(case, weights):
    x, mask = case
    w = np.resize(weights, x.shape)
    tainted = _row_has_unmasked_nan(x, mask)
    for op in (sl.softmax, sl.masked_softmax, sl.log_softmax):

        def loss(x, op=op):
            y = op(x, where=mask)
            return jnp.sum(jnp.where(mask, y, 0.0) * w)

        g = np.asarray(jax.grad(loss)(x))
        np.testing.assert_array_equal(g[~mask], 0.0)
        np.testing.assert_array_equal(g[~mask.any(-1)], 0.0)
        assert not np.any(np.isnan(g[~tainted]))


@given(logits_and_mask(finite_float), hnp.arrays(np.float32, (6,), elements=finite_float))
def test_masked_softmax_with_sink_stays_a_sub_distribution(case, sink):
    x, mask = case
    s = sink[: x.shape[0]] if sink.shape[0] >= x.shape[0] else np.resize(sink, x.shape[0])
    y = np.asarray(sl.masked_softmax(x, where=mask, sink=s), np.float64)
    assert np.all(y >= 0) and np.all(y.sum(-1) <= 1 + 1e-5)
    np.testing.assert_array_equal(y[~mask], 0.0)


@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=8), elements=any_float))
def test_softplus_positive_monotone_and_nan_only_from_nan(x):
    y = np.asarray(sl.softplus(x))
    assert np.all(np.isnan(y) == np.isnan(x))
    assert np.all(y[~np.isnan(x)] >= 0)
    assert np.all(y[~np.isnan(x)] >= np.maximum(x[~np.isnan(x)], 0))
    g = np.asarray(jax.grad(lambda x: jnp.sum(sl.softplus(x)))(x))
    assert np.all((g[~np.isnan(x)] >= 0) & (g[~np.isnan(x)] <= 1))
