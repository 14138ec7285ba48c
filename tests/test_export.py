"""Cross-platform lowering: every public op, its gradient, the layers, the fused loss and ring
attention export for ``cuda`` and ``tpu`` with no stablelayers custom call inside.

On the CPU softmax, log_softmax and softplus call compiled kernels through the XLA FFI; the
choice is ``lax.platform_dependent`` (``_cpu/calls.py``), made when the program is lowered.
A GPU or TPU program that held one of those calls would fail to compile there, so a
regression (choosing the kernels at trace time, say) must fail here, on a CPU-only CI
machine: ``jax.export`` lowers for platforms it has no device for. The control checks that
the CPU export of the same functions does hold the calls, and that the check catches them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

import stablelayers as sl
from stablelayers._cpu import library

ACCELERATORS = ("cuda", "tpu")
KERNEL_TARGETS = frozenset(library.target_name(kernel) for kernel in library.SYMBOLS)
# Every custom call's target, in both of the forms StableHLO prints.
_TARGET = re.compile(r'custom_call @([\w.$-]+)|call_target_name = "([^"]+)"')


def custom_call_targets(exported: jax.export.Exported) -> set[str]:
    """The custom-call targets in an exported module's text."""
    found = _TARGET.findall(exported.mlir_module())
    return {a or b for a, b in found}


def assert_no_stablelayers_call(exported: jax.export.Exported) -> None:
    """Fail if the module calls a CPU kernel (or anything else named stablelayers)."""
    ours = {
        t for t in custom_call_targets(exported) if t in KERNEL_TARGETS or "stablelayers" in t
    }
    assert not ours, f"{exported.platforms} program calls CPU kernels {sorted(ours)}"


def export(
    f: Callable[..., Any],
    args: tuple[Any, ...],
    platforms: tuple[str, ...] = ACCELERATORS,
    **jit_options: Any,
) -> jax.export.Exported:
    # The CPU kernels have no compatibility guarantee, so jax.export refuses them unless
    # told. It is told for every platform, so that a kernel in an accelerator program is
    # caught by assert_no_stablelayers_call, which names the platforms and the kernels.
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in sorted(KERNEL_TARGETS)]
    jitted = jax.jit(f, **jit_options)
    return jax.export.export(jitted, platforms=platforms, disabled_checks=checks)(*args)


def value_and_grad(f: Callable[..., Any], nargs: int) -> Callable[..., Any]:
    """``f``'s summed output and its gradient with respect to every argument (pytrees)."""

    def total(*args: Any) -> jax.Array:
        leaves = jax.tree.leaves(f(*args))
        return sum((jnp.sum(leaf) for leaf in leaves), start=jnp.zeros(()))

    return jax.value_and_grad(total, argnums=tuple(range(nargs)))


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


_MASK = np.array([[True, False, True, True, False, True, True, True]] * 2)
_LABELS = np.array([1, 3, -1, 0])  # -1: ignored (ignore_index)
_SEGMENTS = np.array([[0, 0, 0, 1, 1, 1, 2, 2]])
_QKV = (_f32(1, 8, 2, 4),) * 3

# name -> (function of float arrays only, their shapes); integer and mask inputs are
# constants, since only float inputs have a gradient.
OPS: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
    "softmax": (sl.softmax, (_f32(2, 8),)),
    "softmax_where_initial": (
        lambda x: sl.softmax(x, where=_MASK, initial=0.0),
        (_f32(2, 8),),
    ),
    "softmax_axis0": (lambda x: sl.softmax(x, axis=0), (_f32(2, 8),)),
    "log_softmax": (sl.log_softmax, (_f32(2, 8),)),
    "log_softmax_where": (lambda x: sl.log_softmax(x, where=_MASK), (_f32(2, 8),)),
    "masked_softmax_sink": (
        lambda x, s: sl.masked_softmax(x, where=_MASK, initial=-1.0, sink=s),
        (_f32(2, 8), _f32(2)),
    ),
    "logsumexp": (lambda x: sl.logsumexp(x, axis=-1), (_f32(2, 8),)),
    "softplus": (sl.softplus, (_f32(2, 8),)),
    "softplus_fixed_beta": (lambda x: sl.softplus(x, beta=2.0), (_f32(2, 8),)),
    "softplus_traced_beta": (sl.softplus, (_f32(2, 8), _f32())),
    "sigmoid": (sl.sigmoid, (_f32(2, 8),)),
    "log_sigmoid": (sl.log_sigmoid, (_f32(2, 8),)),
    "softmax_cross_entropy": (
        lambda x: sl.softmax_cross_entropy(
            x, _LABELS, label_smoothing=0.1, z_loss=1e-4, ignore_index=-1, logits_soft_cap=30.0
        ),
        (_f32(4, 8),),
    ),
    "softmax_cross_entropy_probabilities": (sl.softmax_cross_entropy, (_f32(4, 8),) * 2),
    "sigmoid_binary_cross_entropy": (sl.sigmoid_binary_cross_entropy, (_f32(4, 8),) * 2),
    "linear_softmax_cross_entropy_mean": (
        lambda h, w: sl.linear_softmax_cross_entropy(
            h, w, _LABELS, ignore_index=-1, chunk_size=4, reduction="mean", z_loss=1e-4
        ),
        (_f32(4, 6), _f32(6, 8)),
    ),
    "linear_softmax_cross_entropy_none": (
        lambda h, w, b: sl.linear_softmax_cross_entropy(
            h, w, _LABELS, bias=b, ignore_index=-1, chunk_size=4, logits_soft_cap=30.0
        ),
        (_f32(4, 6), _f32(6, 8), _f32(8)),
    ),
    "attention_dense": (
        lambda q, k, v, s: sl.dot_product_attention(
            q, k, v, sink=s, is_causal=True, implementation="dense"
        ),
        (*_QKV, _f32(2)),
    ),
    "attention_chunked": (
        lambda q, k, v: sl.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            implementation="chunked",
            chunk_size=4,
            segment_ids=_SEGMENTS,
            logits_soft_cap=20.0,
        ),
        _QKV,
    ),
    "attention_dense_segments": (
        lambda q, k, v: sl.dot_product_attention(
            q, k, v, implementation="dense", segment_ids=_SEGMENTS, logits_soft_cap=20.0
        ),
        _QKV,
    ),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_and_gradient_export_for_accelerators_without_cpu_kernels(name):
    f, args = OPS[name]
    for g in (f, value_and_grad(f, len(args))):
        exported = export(g, args)
        assert exported.platforms == ACCELERATORS
        assert_no_stablelayers_call(exported)


def test_cpu_export_holds_the_kernels_and_the_check_catches_them():
    # The control: where the kernels load, the CPU program of the same functions calls
    # them (so the accelerator checks above look at the right thing), and the check fails.
    if not library.available():
        pytest.skip("the CPU kernels are unavailable here")
    for name in ("softmax", "log_softmax", "softplus_fixed_beta"):
        f, args = OPS[name]
        for g in (f, value_and_grad(f, len(args))):
            for platforms in (("cpu",), ("cpu", *ACCELERATORS)):
                exported = export(g, args, platforms)
                assert custom_call_targets(exported) & KERNEL_TARGETS, (name, platforms)
                with pytest.raises(AssertionError, match="calls CPU kernels"):
                    assert_no_stablelayers_call(exported)


def _layers() -> dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]:
    """Each layer's apply as a function of (parameters, inputs)."""
    import equinox as eqx
    from flax import nnx

    import stablelayers.equinox as sleqx
    import stablelayers.linen as sllinen
    import stablelayers.nnx as slnnx

    x = jnp.ones((2, 8, 8))
    hidden, labels = jnp.ones((4, 6)), jnp.asarray(_LABELS)
    layers: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}

    graph, state = nnx.split(slnnx.MultiHeadAttention(2, 8, sink=True, rngs=nnx.Rngs(0)))
    layers["nnx_attention"] = (
        lambda s, x: nnx.merge(graph, s)(x, decode=False),
        (state, x),
    )
    graph_h, state_h = nnx.split(slnnx.LMHead(6, 8, rngs=nnx.Rngs(0), ignore_index=-1))
    layers["nnx_lm_head"] = (lambda s, h: nnx.merge(graph_h, s)(h, labels), (state_h, hidden))

    linen_attention = sllinen.MultiHeadDotProductAttention(num_heads=2, sink=True)
    params = linen_attention.init(jax.random.key(0), x)
    layers["linen_attention"] = (lambda p, x: linen_attention.apply(p, x), (params, x))
    linen_head = sllinen.LMHead(vocab_size=8, reduction="mean", ignore_index=-1)
    params_h = linen_head.init(jax.random.key(0), hidden, labels)
    layers["linen_lm_head"] = (lambda p, h: linen_head.apply(p, h, labels), (params_h, hidden))

    attention = sleqx.MultiheadAttention(2, 8, sink=True, key=jax.random.key(0))
    head = sleqx.LMHead(6, 8, key=jax.random.key(1), ignore_index=-1)
    params_a, static_a = eqx.partition(attention, eqx.is_inexact_array)
    params_e, static_e = eqx.partition(head, eqx.is_inexact_array)
    layers["equinox_attention"] = (
        lambda p, x: eqx.combine(p, static_a)(x, x, x),
        (params_a, x[0]),
    )
    layers["equinox_lm_head"] = (
        lambda p, h: eqx.combine(p, static_e)(h, labels),
        (params_e, hidden),
    )
    return layers


def test_layers_export_for_accelerators_without_cpu_kernels():
    for name, (f, args) in _layers().items():
        for g in (f, value_and_grad(f, len(args))):
            exported = export(g, args)
            assert exported.platforms == ACCELERATORS, name
            assert_no_stablelayers_call(exported)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_attention_under_shard_map_on_an_abstract_mesh(layout):
    # An abstract mesh needs no devices: the ring's ppermutes lower for 4 of them here.
    # Inputs sharded on it make the export a 4-device program (nr_devices).
    mesh = AbstractMesh((4,), ("sp",))
    spec = PartitionSpec(None, "sp")
    sharded = (NamedSharding(mesh, spec),) * 3

    def local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        out = sl.ring_attention(
            q, k, v, axis_name="sp", is_causal=True, layout=layout, logits_soft_cap=20.0
        )
        assert isinstance(out, jax.Array)
        return out

    ring = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    args = (_f32(1, 16, 2, 4),) * 3
    for g in (ring, value_and_grad(ring, 3)):
        exported = export(g, args, in_shardings=sharded)
        assert exported.nr_devices == 4
        assert "collective_permute" in exported.mlir_module()
        assert_no_stablelayers_call(exported)
