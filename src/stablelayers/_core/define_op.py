"""One way to define an op: a primal with its reverse-mode rule and its forward-mode rule.

JAX cannot run forward-mode autodiff through a ``jax.custom_vjp`` function, and a
``jax.custom_jvp`` one keeps, in reverse mode, whatever its linearised tangent map needs
rather than the one residual a hand-written backward pass keeps. So each op is built twice
from the same primal: a ``custom_vjp`` (the default: lean residuals) and a ``custom_jvp``
(inside :func:`stablelayers.forward_mode`), and the switch is read when the op is traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Generic, ParamSpec, TypeVar

import jax

from stablelayers._core.rank_promotion import allow_rank_promotion
from stablelayers._core.switches import forward_mode_enabled

P = ParamSpec("P")
R = TypeVar("R")


class Op(Generic[P, R]):
    """A primal with exact derivative rules in both modes; call it like the primal.

    ``vjp`` and ``jvp`` are the two ``jax.custom_*`` functions it dispatches to (``jvp`` is
    ``None`` for an op that has only a reverse-mode rule).
    """

    def __init__(
        self,
        primal: Callable[P, R],
        vjp: Callable[P, R],
        jvp: Callable[P, R] | None,
    ) -> None:
        self.primal = primal
        self.vjp = vjp
        self.jvp = jvp
        functools.update_wrapper(self, primal)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.jvp is not None and forward_mode_enabled():
            return self.jvp(*args, **kwargs)
        return self.vjp(*args, **kwargs)


def define_op(
    primal: Callable[P, R],
    *,
    fwd: Callable[..., tuple[R, Any]],
    bwd: Callable[..., Any],
    jvp: Callable[..., tuple[R, Any]] | None = None,
    nondiff_argnums: Sequence[int] = (),
) -> Op[P, R]:
    """Build an op from its primal and its rules, as ``jax.custom_vjp`` and
    ``jax.custom_jvp`` take them.

    Args:
        primal: ``primal(*args) -> out``, the value.
        fwd: ``fwd(*args) -> (out, residuals)``, the reverse-mode forward pass.
        bwd: ``bwd(*nondiff_args, residuals, g) -> cotangents`` (one per differentiable
            argument, a tuple).
        jvp: ``jvp(*nondiff_args, primals, tangents) -> (out, tangent_out)``; leave it out
            for an op whose forward mode is handled by its caller.
        nondiff_argnums: the positions of static (hashable, non-array) arguments, passed
            first to ``bwd`` and ``jvp`` as the ``jax.custom_*`` functions pass them.

    Returns:
        An :class:`Op`, traced with the reverse-mode rule, or with the forward-mode rule
        inside :func:`stablelayers.forward_mode`.
    """
    nondiff = tuple(nondiff_argnums)
    vjp_op = jax.custom_vjp(primal, nondiff_argnums=nondiff)
    vjp_op.defvjp(allow_rank_promotion(fwd), allow_rank_promotion(bwd))
    jvp_op = None
    if jvp is not None:
        jvp_op = jax.custom_jvp(primal, nondiff_argnums=nondiff)
        jvp_op.defjvp(allow_rank_promotion(jvp))
    return Op(primal, vjp_op, jvp_op)
