r"""softplus: ``y = log1p(exp(beta * x)) / beta``, and its derivative ``sigmoid(beta * x)``
read from the output.

The public function, then the primal (float32 as polynomials, float64 through
``log1p_unit``), the derivatives from the output alone, the reverse-mode rules (for an
array ``beta``, differentiable, and for a constant Python one), the forward-mode rule, and
the CPU kernels that stand in for the constant-``beta`` rules on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stablelayers._core import checks
from stablelayers._core.arithmetic import (
    LOG1P_QUOTIENT_FLOAT32,
    LOG2_HI,
    LOG2_LO,
    SOFTPLUS_NEAR_ZERO_BOUND,
    SOFTPLUS_NEAR_ZERO_FLOAT32,
    compute_dtype,
    exp_pair_float32,
    horner,
    log1p_unit,
    neg_expm1,
)
from stablelayers._core.define_op import define_op
from stablelayers._core.nonfinite import is_posinf
from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers._core.switches import forward_mode_enabled
from stablelayers._cpu import calls, library


@allow_rank_promotion
def softplus(x: ArrayLike, beta: ArrayLike = 1.0) -> jax.Array:
    r"""Softplus with a temperature, accurate over the whole float range.

    .. math::
        \mathrm{softplus}(x; \beta) = \frac{\log(1 + e^{\beta x})}{\beta}
        = \frac{\max(\beta x, 0) + \mathrm{log1p}(e^{-|\beta x|})}{\beta}

    There is no threshold where the formula switches, so no kink: ``+inf -> +inf``,
    ``-inf -> 0``, ``nan -> nan``. The derivative is ``sigmoid(beta * x)``, computed in the
    backward pass from the output alone as ``-expm1(-beta * y)``, so only ``y`` is kept.

    Args:
        x: input of any shape (integers promoted; half precision computed in float32).
        beta: positive temperature, a Python number or an array broadcastable to
            ``x.shape``. An array ``beta`` is differentiable (a learnable sharpness); a
            Python number is a constant.

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        ValueError: a concrete ``beta`` is not positive and finite. A traced ``beta`` is
            not checked (docs/semantics.md says what the formula then gives).
    """
    x = checks.as_float_array(x)
    checks.check_beta(beta)
    if isinstance(beta, (int, float)) and not forward_mode_enabled():
        # A forward-mode trace takes the array path below: this op has no JVP rule.
        return softplus_fixed_beta_op(x, float(beta), library.available())
    beta = checks.as_float_array(beta, "beta")
    if not checks.broadcasts_to(beta.shape, x.shape):
        raise ValueError(
            f"`beta` of shape {beta.shape} does not broadcast to the input's shape {x.shape}."
        )
    return softplus_op(x, beta)


def _primal(x: jax.Array, beta: jax.Array) -> jax.Array:
    out_dtype = x.dtype
    dtype = compute_dtype(out_dtype)
    x = x.astype(dtype)
    u = beta.astype(dtype) * x
    y = _softplus_float32(u) if jnp.finfo(dtype).bits <= 32 else _softplus_float64(u)
    # Where beta * x overflows, softplus(beta * x) / beta is x itself.
    y = jnp.where(is_posinf(u), x, y / beta.astype(dtype))
    return y.astype(out_dtype)


def _softplus_float32(u: jax.Array) -> jax.Array:
    # Polynomials only (exp included): no log, no division, so XLA compiles it to one pass.
    # Away from 0: softplus(u) = max(u, 0) + log1p(t) with t = exp(-|u|) <= exp(-1), and
    # log1p(t) = t + t^2 * Q(t): t passes through exactly and only the correction (at most
    # 16% of log1p(t)) is rounded. Near 0, where t ~ 1 and that correction reaches 44%:
    # softplus(u) = log(2) + u / 2 + u^2 * E(u^2), where u / 2 is exact and only the last
    # two additions round. Each form is evaluated where it is chosen or at a harmless point,
    # so both stay finite under differentiation.
    positive = u > 0
    near_zero = jnp.abs(u) < SOFTPLUS_NEAR_ZERO_BOUND
    t, t_lo = exp_pair_float32(jnp.where(positive, -u, u))
    # log1p(t + t_lo) = log1p(t) + t_lo / (1 + t) to first order, and 1 / (1 + t) is
    # 1 - t to within 14% here, on a term below an ulp of the result.
    log1p_t = t + ((t_lo - t_lo * t) + t * (t * horner(LOG1P_QUOTIENT_FLOAT32, t)))
    far = jnp.where(positive, u, 0.0) + log1p_t
    v = jnp.where(near_zero, u, 0.0)
    s = v * v
    near = LOG2_HI + (0.5 * v + (s * horner(SOFTPLUS_NEAR_ZERO_FLOAT32, s) + LOG2_LO))
    return jnp.where(near_zero, near, far)


def _softplus_float64(u: jax.Array) -> jax.Array:
    # log1p(exp(u)) = max(u, 0) + log1p(exp(-|u|)): exp never overflows, and there is no
    # threshold where the formula switches (torch's softplus switches at u > 20). Written
    # with one select instead of max/abs so that each branch is smooth and autodiff of this
    # primal gives the right second derivative at u = 0.
    positive = u > 0
    return jnp.where(positive, u, 0.0) + log1p_unit(jnp.exp(jnp.where(positive, -u, u)))


def sigmoid_from_output(y: jax.Array, beta: jax.Array) -> jax.Array:
    """sigmoid(beta * x), from the output: beta * y = softplus(u) and 1 - exp(-softplus(u))
    = sigmoid(u), so sigmoid = -expm1(-beta * y)."""
    dtype = compute_dtype(y.dtype)
    return neg_expm1(beta.astype(dtype) * y.astype(dtype))


def _beta_slope(y: jax.Array, beta: jax.Array) -> jax.Array:
    """d y / d beta, from the output alone.

    With v = beta * y = softplus(u), u = beta * x and s = sigmoid(u) = -expm1(-v):
    u = v + log(s) (softplus inverted), so
    d y / d beta = (x * s - y) / beta = (s * log(s) - v * exp(-v)) / beta^2.
    Both terms are computed without cancellation; each vanishes at v = 0 and v = inf.
    """
    dtype = compute_dtype(y.dtype)
    beta = beta.astype(dtype)
    v = beta * y.astype(dtype)
    exp_neg_v = jnp.exp(-v)
    sig = neg_expm1(v)
    # log(s) = log1p(-exp(-v)) is the accurate form once s > 1/2. Each branch gets inputs
    # that keep it finite where it is not selected, so second derivatives stay finite too.
    large = v > jnp.log(2.0)
    sig_safe = jnp.where(large | (sig == 0), 1.0, sig)
    exp_neg_v_safe = jnp.where(large, exp_neg_v, 0.5)
    log_sig = jnp.where(large, jnp.log1p(-exp_neg_v_safe), jnp.log(sig_safe))
    v_safe = jnp.where(is_posinf(v), 0.0, v)
    return (sig * log_sig - v_safe * exp_neg_v) / (beta * beta)


def _fwd(x: jax.Array, beta: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = _primal(x, beta)
    return y, (y, beta)


def _bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # softplus'(u) = sigmoid(u), read from the output: g * -expm1(-beta * y).
    y, beta = residuals
    sig = sigmoid_from_output(y, beta)
    g = g.astype(sig.dtype)
    grad_beta = checks.sum_to_shape(g * _beta_slope(y, beta), beta.shape)
    return (g * sig).astype(y.dtype), grad_beta.astype(beta.dtype)


def _jvp_rule(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    x, beta = primals
    x_dot, beta_dot = tangents
    y = _primal(x, beta)
    sig = sigmoid_from_output(y, beta)
    d_beta = _beta_slope(y, beta)
    y_dot = sig * x_dot.astype(sig.dtype) + d_beta * beta_dot.astype(sig.dtype)
    return y, y_dot.astype(y.dtype)


softplus_op = define_op(_primal, fwd=_fwd, bwd=_bwd, jvp=_jvp_rule)


# A constant Python beta: no beta gradient to compute or keep, and float32 softplus and
# its derivative run the CPU kernels where they apply (the same float32 algorithm for the
# value; the derivative's -expm1 takes one Cody-Waite reduction there, see the C++).


def _kernel_reference(x: jax.Array, beta: float) -> jax.Array:
    return _primal(x, jnp.asarray(beta, jnp.float32))


def _grad_kernel_reference(y: jax.Array, g: jax.Array, beta: float) -> jax.Array:
    return g * sigmoid_from_output(y, jnp.asarray(beta, jnp.float32))


_kernel = calls.differentiable_as(_kernel_reference, nondiff_argnums=(1,))(calls.softplus)
_grad_kernel = calls.differentiable_as(_grad_kernel_reference, nondiff_argnums=(2,))(
    calls.softplus_grad
)


def _fixed_beta_values(x: jax.Array, beta: float, kernels: bool) -> jax.Array:
    if not calls.kernels_take(x):
        return _primal(x, jnp.asarray(beta))

    def kernel(x: jax.Array) -> jax.Array:
        return _kernel(x.astype(jnp.float32), beta).astype(x.dtype)

    return calls.on_cpu(kernel, lambda x: _primal(x, jnp.asarray(beta)), kernels, x)


def _fixed_beta_fwd(x: jax.Array, beta: float, kernels: bool) -> tuple[jax.Array, jax.Array]:
    y = _fixed_beta_values(x, beta, kernels)
    return y, y


def _fixed_beta_bwd(beta: float, kernels: bool, y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    def pure_jax(y: jax.Array, g: jax.Array) -> jax.Array:
        sig = sigmoid_from_output(y, jnp.asarray(beta))
        return (g.astype(sig.dtype) * sig).astype(y.dtype)

    if not calls.kernels_take(y):
        return (pure_jax(y, g),)

    def kernel(y: jax.Array, g: jax.Array) -> jax.Array:
        f32 = jnp.float32
        return _grad_kernel(y.astype(f32), g.astype(f32), beta).astype(y.dtype)

    return (calls.on_cpu(kernel, pure_jax, kernels, y, g),)


# Reverse mode only: under forward_mode(), softplus calls softplus_op instead.
softplus_fixed_beta_op = define_op(
    _fixed_beta_values,
    fwd=_fixed_beta_fwd,
    bwd=_fixed_beta_bwd,
    jvp=None,
    nondiff_argnums=(1, 2),
)
