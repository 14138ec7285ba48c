"""Vocabulary-parallel fused loss checks, run by tests/test_vocab_parallel_loss.py in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count
is fixed when JAX starts). Prints one JSON object: each check's worst relative error (or
a flag)."""

from __future__ import annotations

import json
import os
import re

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import stablelayers as sl  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
T, D, VL = 64, 16, 48  # tokens, hidden, columns per device of 8 (V = 384)
V = 8 * VL
IGNORE = -100


def rel(a, b, nan: bool = False) -> float:
    """Worst relative error; NaN only where the reference has NaN, and only if ``nan``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not nan and not np.all(np.isfinite(b)):
        return float("inf")
    same_nan = np.array_equal(np.isnan(a), np.isnan(b))
    if not same_nan:
        return float("inf")
    ok = ~np.isnan(b)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[ok] - b[ok])) / max(np.max(np.abs(b[ok])), 1e-30))


def worst(xs, ys, nan: bool = False) -> float:
    pairs = zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True)
    return max(rel(x, y, nan) for x, y in pairs)


def inputs(seed: int, config: str):
    ks = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(ks[0], (T, D))
    w = jax.random.normal(ks[1], (D, V)) * 0.5
    b = jax.random.normal(ks[2], (V,))
    y = jax.random.randint(ks[3], (T,), 0, V)
    g = jax.random.normal(ks[4], (T,))  # cotangent of the per-token loss
    mask = None
    if config == "all":
        y = y.at[:5].set(IGNORE)
        h = h.at[2].set(jnp.nan)  # an ignored token's features are never read
        mask = jnp.ones((V,), bool).at[jnp.array([3, 100, 200, V - 1])].set(False)
        y = y.at[6].set(100)  # a label on a masked class
    if config == "out_of_range":
        y = y.at[3].set(V).at[7].set(-1)
    return h, w, b, y, g, mask


def options(config: str) -> dict:
    if config == "all":
        return dict(label_smoothing=0.1, z_loss=1e-3, logits_soft_cap=5.0, ignore_index=IGNORE)
    return {}


def vocab_vs_one(n: int, reduction: str, config: str) -> float:
    """Values and gradients (dh, dW, db; and the traced options') of the sharded entry
    point on n devices against one device's linear_softmax_cross_entropy."""
    mesh = Mesh(np.array(jax.devices()[:n]), ("tp",))
    h, w, b, y, g, mask = inputs(n + len(config), config)
    opts = options(config)
    traced = config == "traced"

    def loss(fn, h, w, b, eps, z, cap, **kw):
        extra = dict(label_smoothing=eps, z_loss=z, logits_soft_cap=cap) if traced else {}
        out = fn(h, w, y, bias=b, vocab_mask=mask, reduction=reduction, **opts, **extra, **kw)
        return jnp.sum(out * g) if reduction == "none" else out

    args = (h, w, b, 0.1, 1e-2, 4.0)
    argnums = (0, 1, 2, 3, 4, 5) if traced else (0, 1, 2)
    one = jax.jit(
        jax.value_and_grad(
            lambda *a: loss(sl.linear_softmax_cross_entropy, *a), argnums=argnums
        )
    )(*args)
    many = jax.jit(
        jax.value_and_grad(
            lambda *a: loss(
                sl.linear_softmax_cross_entropy_sharded,
                *a,
                mesh=mesh,
                axis_name="tp",
                chunk_size=20,
            ),
            argnums=argnums,
        )
    )(*args)
    if config == "out_of_range":
        # NaN where one device has NaN: the bad tokens (and, reduced, everything).
        nan = np.isnan(np.asarray(one[0])).any()
        return worst(many, one, nan=True) if nan else float("inf")
    return worst(many, one)


def data_by_vocab() -> dict[str, float]:
    """A 2 x 4 data x vocab mesh: the entry point with token_axis, and the user's own
    shard_map (check_vma on and off) calling linear_softmax_cross_entropy(axis_name=)."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tp"))
    h, w, b, y, g, mask = inputs(11, "all")
    opts = options("all")

    def one(h, w, b):
        out = sl.linear_softmax_cross_entropy(h, w, y, bias=b, vocab_mask=mask, **opts)
        return jnp.sum(out * g)

    def entry(h, w, b):
        out = sl.linear_softmax_cross_entropy_sharded(
            h,
            w,
            y,
            bias=b,
            vocab_mask=mask,
            mesh=mesh,
            axis_name="tp",
            token_axis="data",
            **opts,
        )
        return jnp.sum(out * g)

    def user(check_vma: bool, reduction: str = "none"):
        def local(h, w, b, y, m, g):
            out = sl.linear_softmax_cross_entropy(
                h,
                w,
                y,
                bias=b,
                vocab_mask=m,
                axis_name="tp",
                chunk_size=16,
                **opts,
                reduction=reduction,
            )
            return jax.lax.psum(jnp.sum(out * g) if reduction == "none" else out, "data")

        f = jax.shard_map(
            local,
            mesh=mesh,
            check_vma=check_vma,
            in_specs=(P("data"), P(None, "tp"), P("tp"), P("data"), P("tp"), P("data")),
            out_specs=P(),
        )
        return lambda h, w, b: f(h, w, b, y, mask, g)

    def vg(f):
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, b)

    ref = vg(one)
    out = {
        "data_vocab_entry": worst(vg(entry), ref),
        "data_vocab_user_vma": worst(vg(user(True)), ref),
        "data_vocab_user_novma": worst(vg(user(False)), ref),
    }
    # reduction='sum' inside the user's shard_map: the summed op on each device.
    ref_sum = jax.jit(
        jax.value_and_grad(
            lambda h, w, b: sl.linear_softmax_cross_entropy(
                h, w, y, bias=b, vocab_mask=mask, reduction="sum", **opts
            ),
            argnums=(0, 1, 2),
        )
    )(h, w, b)
    out["data_vocab_user_sum_vma"] = worst(vg(user(True, "sum")), ref_sum)
    out["data_vocab_user_sum_novma"] = worst(vg(user(False, "sum")), ref_sum)

    # Traced options as replicated shard_map inputs: their gradients, both check_vma.
    def traced(check_vma: bool, reduction: str):
        def local(h, w, y, g, eps, z, cap):
            out = sl.linear_softmax_cross_entropy(
                h,
                w,
                y,
                axis_name="tp",
                label_smoothing=eps,
                z_loss=z,
                logits_soft_cap=cap,
                reduction=reduction,
                ignore_index=IGNORE,
            )
            return jax.lax.psum(jnp.sum(out * g) if reduction == "none" else out, "data")

        f = jax.shard_map(
            local,
            mesh=mesh,
            check_vma=check_vma,
            out_specs=P(),
            in_specs=(P("data"), P(None, "tp"), P("data"), P("data"), P(), P(), P()),
        )
        return lambda h, w, *o: f(h, w, y, g, *o)

    def plain(reduction: str):
        def f(h, w, eps, z, cap):
            out = sl.linear_softmax_cross_entropy(
                h,
                w,
                y,
                label_smoothing=eps,
                z_loss=z,
                logits_soft_cap=cap,
                reduction=reduction,
                ignore_index=IGNORE,
            )
            return jnp.sum(out * g) if reduction == "none" else out

        return f

    hw = (jnp.nan_to_num(h), w, 0.1, 1e-2, 4.0)
    for reduction in ("sum",):  # the per-token loss's traced options: eq_8_*_traced
        want = jax.jit(jax.value_and_grad(plain(reduction), argnums=range(5)))(*hw)
        for vma in (True, False):
            got = jax.jit(jax.value_and_grad(traced(vma, reduction), argnums=range(5)))(*hw)
            out[f"data_vocab_traced_{reduction}_{'vma' if vma else 'novma'}"] = worst(got, want)
    mean = jax.jit(
        lambda h: sl.linear_softmax_cross_entropy_sharded(
            h, w, y, mesh=mesh, axis_name="tp", token_axis="data", reduction="mean", **opts
        )
    )(h)
    out["data_vocab_mean"] = rel(
        mean, sl.linear_softmax_cross_entropy(h, w, y, reduction="mean", **opts)
    )
    return out


_COLLECTIVE = re.compile(
    r"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*? (all-gather|all-to-all)(?:-start)?\("
)


def full_vocab_gathers(n: int) -> dict[str, int]:
    """All-gathers or all-to-alls in the compiled program whose result has a dimension of
    the whole vocabulary, for the value and value_and_grad ('none' and 'mean')."""
    mesh = Mesh(np.array(jax.devices()[:n]), ("tp",))
    h, w, b, y, g, _ = inputs(3, "plain")
    out = {}
    for reduction in ("none", "mean"):

        def f(h, w, b, reduction=reduction):
            loss = sl.linear_softmax_cross_entropy_sharded(
                h, w, y, bias=b, mesh=mesh, axis_name="tp", reduction=reduction, chunk_size=20
            )
            return jnp.sum(loss * g) if reduction == "none" else loss

        for name, fn in (("value", f), ("grad", jax.value_and_grad(f, argnums=(0, 1, 2)))):
            text = jax.jit(fn).lower(h, w, b).compile().as_text()
            hits = [
                m
                for m in _COLLECTIVE.finditer(text)
                if V in [int(d) for d in m.group(2).split(",") if d]
            ]
            out[f"gathers_{n}_{reduction}_{name}"] = len(hits)
    return out


def detects_gather() -> int:
    """The control: GSPMD's plain jit of the loss on a sharded weight does gather it
    (issue 25), so the pattern above finds what it looks for."""
    from jax.sharding import NamedSharding

    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    h, w, _, y, g, _ = inputs(3, "plain")
    w = jax.device_put(w, NamedSharding(mesh, P(None, "tp")))
    text = (
        jax.jit(
            lambda h, w: jnp.sum(sl.linear_softmax_cross_entropy(h, w, y, chunk_size=20) * g)
        )
        .lower(h, w)
        .compile()
        .as_text()
    )
    return sum(
        V in [int(d) for d in m.group(2).split(",") if d] for m in _COLLECTIVE.finditer(text)
    )


def forward_mode() -> dict[str, float]:
    """Forward mode (stablelayers.forward_mode: the custom_jvp rule) on 4 devices: the
    tangent of the per-token loss in every input direction."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    h, w, b, y, _, mask = inputs(5, "all")
    opts = options("all")
    dots = (jnp.cos(h), jnp.sin(w), jnp.cos(b))
    h = jnp.nan_to_num(h)  # a NaN tangent would reach the ignored token's dot

    def run(fn, **kw):
        def f(h, w, b):
            return fn(h, w, y, bias=b, vocab_mask=mask, **opts, **kw)

        with sl.forward_mode():
            return jax.jit(lambda *a: jax.jvp(f, a, dots))(h, w, b)

    out = {}
    for reduction in ("none", "mean"):
        many = run(
            sl.linear_softmax_cross_entropy_sharded,
            mesh=mesh,
            axis_name="tp",
            reduction=reduction,
        )
        out[f"forward_mode_{reduction}"] = worst(
            many, run(sl.linear_softmax_cross_entropy, reduction=reduction)
        )
    return out


def layers() -> dict[str, float]:
    """The NNX, Linen and Equinox LM heads with vocab_axis on a 2 x 4 (data, tp) mesh,
    their parameters placed by the partitioning metadata (NNX, Linen) or by hand
    (Equinox), against the same heads without it: loss (mean) and its gradients."""
    import equinox as eqx
    from flax import linen as nn
    from flax import nnx
    from jax.sharding import NamedSharding

    from stablelayers import equinox as sleqx
    from stablelayers import linen as sllinen
    from stablelayers import nnx as slnnx

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tp"))
    h, _, _, y, _, _ = inputs(13, "all")
    kw = dict(z_loss=1e-3, label_smoothing=0.1, ignore_index=IGNORE, reduction="mean")
    par = dict(vocab_axis="tp", token_axis="data", mesh=mesh)
    out = {}

    tp = slnnx.LMHead(D, V, rngs=nnx.Rngs(0), **par, **kw)
    ref = slnnx.LMHead(D, V, rngs=nnx.Rngs(0), **kw)
    graph, state = nnx.split(tp)
    # Flax placed the parameters by their metadata when it created them.
    assert nnx.get_partition_spec(state)["kernel"].get_value() == P(None, "tp")
    assert tp.kernel[...].sharding.spec == P(None, "tp"), tp.kernel[...].sharding

    def nnx_loss(state, graph=graph):
        return nnx.merge(graph, state)(h, y)

    g_ref, s_ref = nnx.split(ref)
    got = jax.jit(jax.value_and_grad(nnx_loss))(state)
    want = jax.value_and_grad(lambda s: nnx.merge(g_ref, s)(h, y))(s_ref)
    out["layer_nnx"] = worst(got, want)

    tp_l = sllinen.LMHead(V, **par, **kw)
    variables = tp_l.init(jax.random.key(0), h, y)
    specs = nn.get_partition_spec(variables)
    assert specs["params"]["kernel"] == P(None, "tp"), specs
    params = nn.unbox(variables)
    params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    ref_l = sllinen.LMHead(V, **kw)
    got = jax.jit(jax.value_and_grad(lambda p: tp_l.apply(p, h, y)))(params)
    want = jax.value_and_grad(lambda p: ref_l.apply(p, h, y))(nn.unbox(variables))
    out["layer_linen"] = worst(got, want)

    tp_e = sleqx.LMHead(D, V, key=jax.random.key(0), **par, **kw)
    ref_e = sleqx.LMHead(D, V, key=jax.random.key(0), **kw)
    tp_e = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        tp_e,
        (
            jax.device_put(tp_e.weight, NamedSharding(mesh, P(None, "tp"))),
            jax.device_put(tp_e.bias, NamedSharding(mesh, P("tp"))),
        ),
    )
    got = eqx.filter_jit(eqx.filter_value_and_grad(lambda m: m(h, y)))(tp_e)
    want = eqx.filter_value_and_grad(lambda m: m(h, y))(ref_e)
    out["layer_equinox"] = worst(got, want)
    return out


def main() -> None:
    results: dict[str, float] = {}
    for reduction in ("none", "mean", "sum"):
        for config in ("all", "traced", "out_of_range"):
            results[f"eq_8_{reduction}_{config}"] = vocab_vs_one(8, reduction, config)
        results[f"eq_4_{reduction}_all"] = vocab_vs_one(4, reduction, "all")
    results.update(data_by_vocab())
    for n in (4, 8):
        results.update(full_vocab_gathers(n))
    results["control_gathers"] = detects_gather()
    results.update(forward_mode())
    results.update(layers())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
