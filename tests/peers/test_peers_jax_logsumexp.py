"""JAX's own logsumexp tests (tests/lax_scipy_test.py at jax-v0.10.2), re-written against
stablelayers.

Every test there whose name holds "LogSumExp" is here, against ``stablelayers.logsumexp``
in place of ``jax.scipy.special.logsumexp``, checked as JAX checks it: with JAX's own
test helpers (``_CheckAgainstNumpy`` against SciPy, ``_CompileAndCheck`` eager against
jitted, ``assertAllClose`` with its per-dtype tolerances and dtype check) and JAX's random
inputs (``rand_default``, ``rand_bool``). JAX's test draws from a product of shapes, axes,
dtypes, ``keepdims``, ``return_sign`` and ``b``; the cases below keep one of each
distinct behaviour: every shape group (``b`` broadcast with ``a`` either way and both
ways), negative and positive axes, a size-1 axis, every dtype family. The dtypes are
JAX's (float, complex, integer: 32-bit ones always, 64-bit ones under x64, as
``jtu.dtypes`` lists them), and every test runs in float32 and under x64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as osp_special
from jax._src import test_util as jtu  # JAX's own test helpers, as its suite uses them

import stablelayers as sl


class _JaxChecks(jtu.JaxTestCase):
    """JAX's TestCase, for its assertion helpers only."""

    __test__ = False  # not a test class of this suite: pytest must not collect it

    def runTest(self):  # unittest wants a test method to construct the case
        pass


CHECKS = _JaxChecks()


@pytest.fixture
def precision(request):
    with jax.enable_x64(request.param == "x64"):
        yield request.param


def _rng():
    return np.random.RandomState(0)


# The tests without a product of cases: each in float32 and under x64.
BOTH = pytest.mark.parametrize("precision", ["float32", "x64"], indirect=True)
X64_ONLY = {np.float64, np.complex128, np.int64}
SLOW = pytest.mark.slow


def _case(*values, marks=None, slow_x64=False):
    return values, [marks] if marks else [], slow_x64


def _lse_cases(cases):
    """JAX's dtype lists: 64-bit dtypes only under x64. A 32-bit case under x64 that
    repeats its float32 run (same dtypes, same code) is marked slow."""
    out = []
    for values, marks, slow_x64 in cases:
        (shapes, axis, dtype, keepdims, return_sign) = values
        b = "b" if len(shapes) == 2 else "nob"
        name = f"{'_'.join(map(str, shapes))}-{b}-axis{axis}-{dtype.__name__}"
        name += f"-kd{int(keepdims)}-rs{int(return_sign)}"
        for p in ["float32", "x64"]:
            if p == "float32" and dtype in X64_ONLY:
                continue
            extra = [SLOW] if p == "x64" and slow_x64 else []
            out.append(pytest.param(p, *values, marks=marks + extra, id=f"{p}-{name}"))
    return out


LSE_CASES = _lse_cases(
    [
        # No b: (shapes,), axis, dtype, keepdims, return_sign.
        _case([(4,)], -1, np.float32, False, False, slow_x64=True),
        _case([(3, 4)], 0, np.float32, True, False, slow_x64=True),
        _case([(3, 1)], -1, np.float32, False, True, slow_x64=True),
        _case([(2, 3, 4)], 1, np.float64, True, True),
        _case([(1, 4)], -2, np.int32, False, False),
        _case([(2, 1, 4)], -3, np.int64, False, True),
        _case([(3, 4)], 1, np.complex64, False, False),
        _case([(2, 3, 4)], 2, np.complex128, True, True),
        # With b: (a's shape, b's shape), ...
        _case([(4,), (3, 4)], -1, np.float32, False, False),
        _case([(3, 4), (4,)], 0, np.float32, True, True),
        _case([(3, 1), (1, 4)], 1, np.float32, False, True),
        _case([(2, 3, 4), (2, 1, 4)], -2, np.float64, False, True),
        _case([(2, 1, 4), (2, 3, 4)], 0, np.float32, True, False, slow_x64=True),
        _case([(3, 4), (3, 4)], -1, np.int32, False, True),
        _case([(1, 4), (3, 1)], -1, np.float64, True, False),
        _case([(4,), (4,)], 0, np.complex64, False, True),
    ]
)


@pytest.mark.parametrize(
    "precision, shapes, axis, dtype, keepdims, return_sign", LSE_CASES, indirect=["precision"]
)
@pytest.mark.filterwarnings("ignore:invalid value encountered in .*:RuntimeWarning")
def test_logsumexp(precision, shapes, axis, dtype, keepdims, return_sign):
    # origin: testLogSumExp
    rng = jtu.rand_default(_rng())
    use_b = len(shapes) == 2

    def scipy_fun(*args):
        b = args[1] if use_b else None
        res = osp_special.logsumexp(
            args[0], axis, keepdims=keepdims, return_sign=return_sign, b=b
        )
        if dtype == np.int32:
            res = jax.tree.map(lambda x: x.astype("float32"), res)
        return res

    def lax_fun(*args):
        b = args[1] if use_b else None
        return sl.logsumexp(args[0], axis, keepdims=keepdims, return_sign=return_sign, b=b)

    def args_maker():
        return [rng(shape, dtype) for shape in shapes]

    # JAX's test explicitly exercises implicit rank promotion.
    with jax.numpy_rank_promotion("allow"):
        CHECKS._CheckAgainstNumpy(scipy_fun, lax_fun, args_maker)
        tol = {np.float32: 1e-6, np.float64: 1e-14}
        CHECKS._CompileAndCheck(lax_fun, args_maker, rtol=tol, atol=tol)


@BOTH
def test_logsumexp_complex_sign(precision):
    # origin: testLogSumExpComplexSign
    x = jnp.array([1 + 1j, 2 - 1j, -2 + 3j])
    logsumexp, sign = sl.logsumexp(x, return_sign=True)
    expected_sumexp = jnp.exp(x).sum()
    expected_sign = expected_sumexp / abs(expected_sumexp).astype(x.dtype)
    assert logsumexp.dtype == sign.real.dtype
    CHECKS.assertAllClose(sign, expected_sign, rtol=1e-6)
    CHECKS.assertAllClose(sign * np.exp(logsumexp).astype(x.dtype), expected_sumexp, rtol=1e-6)


@BOTH
def test_logsumexp_zeros(precision):
    # origin: testLogSumExpZeros (jax issue 5370)
    def scipy_fun(a, b):
        return osp_special.logsumexp(a, b=b)

    def lax_fun(a, b):
        return sl.logsumexp(a, b=b)

    def args_maker():
        return [np.array([-1000, -2]), np.array([1, 0])]

    CHECKS._CheckAgainstNumpy(scipy_fun, lax_fun, args_maker)
    CHECKS._CompileAndCheck(lax_fun, args_maker)


@BOTH
def test_logsumexp_ones(precision):
    # origin: testLogSumExpOnes (jax issue 7390)
    def args_maker():
        return [np.ones(4, dtype="float32")]

    with jax.debug_infs(True):
        CHECKS._CheckAgainstNumpy(osp_special.logsumexp, sl.logsumexp, args_maker)
        CHECKS._CompileAndCheck(sl.logsumexp, args_maker)


@BOTH
def test_logsumexp_nans(precision):
    # origin: testLogSumExpNans (jax issue 7634)
    with jax.debug_nans(True), jax.disable_jit():
        assert sl.logsumexp(1.0) == 1.0
        assert sl.logsumexp(1.0, b=1.0) == 1.0


@BOTH
def test_logsumexp_infs(precision):
    # origin: testLogSumExpInfs
    out, sign = sl.logsumexp(jnp.array([1.0, np.inf]), return_sign=True)
    assert out == np.inf
    assert sign == 1.0


# Every shape in float32; under x64 float64 at three sizes and float32 at one (the rest of
# the x64 product marked slow).
WHERE_CASES = [
    pytest.param(
        p,
        shape,
        dtype,
        id=f"{p}-{shape[0]}-{dtype.__name__}",
        marks=[SLOW] if p == "x64" and dtype == np.float32 and shape != (3,) else [],
    )
    for p in ["float32", "x64"]
    for dtype in [np.float32, np.float64]
    for shape in [(0,), (1,), (2,), (3,), (4,), (5,)]
    if not (p == "float32" and dtype == np.float64)
    if dtype == np.float32 or shape in [(0,), (3,), (5,)]
]


@pytest.mark.parametrize("precision, shape, dtype", WHERE_CASES, indirect=["precision"])
def test_logsumexp_where(precision, shape, dtype):
    # origin: testLogSumExpWhere
    state = _rng()  # one stream for both, as JAX's self.rng()
    x = jtu.rand_default(state)(shape, dtype)
    mask = jtu.rand_bool(state)(shape, bool)
    y_expected = osp_special.logsumexp(x[mask]) if mask.any() else -jnp.inf
    y_actual = sl.logsumexp(x, where=mask)
    CHECKS.assertAllClose(y_expected, y_actual, check_dtypes=False)


@BOTH
def test_logsumexp_where_grad(precision):
    # origin: testLogSumExpWhereGrad
    x = jnp.array([0.0, 0.0, 0.0, 0.0, 100.0])
    g = jax.grad(lambda x: sl.logsumexp(x, where=jnp.arange(5) < 4))(x)
    CHECKS.assertAllClose(g, jnp.array([0.25, 0.25, 0.25, 0.25, 0.0]))
