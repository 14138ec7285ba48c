"""Multi-device checks, run by tests/test_ring_attention.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count must be set
before JAX starts). Prints one JSON object: each check's worst relative error."""

from __future__ import annotations

import json
import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import stablelayers as sl  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
B, L, H, D = 2, 64, 4, 8


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite result"
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def worst(xs, ys) -> float:
    return max(rel(x, y) for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True))


def ring_vs_dense(n: int, causal: bool) -> float:
    mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
    ks = jax.random.split(jax.random.key(n + causal), 4)
    q = jax.random.normal(ks[0], (B, L, H, D))
    k, v = (jax.random.normal(kk, (B, L, H // 2, D)) for kk in ks[1:3])  # grouped heads
    sink = jax.random.normal(ks[3], (H,))
    # Entry 1: 5 queries and 9 keys, so most devices' query blocks are empty.
    ql, kl = jnp.array([L, 5]), jnp.array([L - 7, 9])
    kw = dict(sink=None, is_causal=causal, query_seq_lengths=ql, key_value_seq_lengths=kl)

    def dense(q, k, v, s):
        kw["sink"] = s
        o = sl.dot_product_attention(q, k, v, implementation="dense", **kw)
        return o

    def ring(q, k, v, s):
        # On 4 devices the 8-position chunks are padded to blocks of 3.
        kw["sink"] = s
        return sl.ring_attention_sharded(
            q, k, v, mesh=mesh, axis_name="sp", chunk_size=3 if n == 4 else 4, **kw
        )

    def vg(f):
        w = jnp.cos(jnp.arange(L * H * D, dtype=jnp.float32)).reshape(1, L, H, D)
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2, 3)))(
            q, k, v, sink
        ), jax.jit(f)(q, k, v, sink)

    return worst(vg(ring), vg(dense))


def packed_ring(layout: str, causal: bool) -> float:
    """Ring attention with segment ids (ids travel with the keys; zigzag relayout of the
    ids) and a soft cap, on 4 devices, against the dense path with the block-diagonal
    mask: values and gradients of query, key, value and sink. Entry 1 ends in a padding
    segment that the lengths cut off, so its last queries attend nothing."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("sp",))
    ks = jax.random.split(jax.random.key(7 + causal), 4)
    q = jax.random.normal(ks[0], (B, L, H, D))
    k, v = (jax.random.normal(kk, (B, L, H // 2, D)) for kk in ks[1:3])
    sink = jax.random.normal(ks[3], (H,))
    doc = np.repeat(np.arange(1, 9), [3, 13, 9, 1, 20, 6, 8, 4])  # 64 positions, 8 docs
    ids = jnp.asarray(np.stack([doc, np.minimum(doc, 5) * (np.arange(L) < 50)]))
    kl = jnp.array([L, 50])
    mask = (ids[:, :, None] == ids[:, None, :])[:, None]
    kw = dict(is_causal=causal, key_value_seq_lengths=kl, logits_soft_cap=3.0)

    def dense(q, k, v, s):
        return sl.dot_product_attention(
            q, k, v, mask=mask, sink=s, implementation="dense", **kw
        )

    def ring(q, k, v, s):
        return sl.ring_attention_sharded(
            q,
            k,
            v,
            mesh=mesh,
            axis_name="sp",
            chunk_size=4,
            segment_ids=ids,
            sink=s,
            layout=layout,
            **kw,
        )

    def vg(f):
        w = jnp.sin(jnp.arange(L * H * D, dtype=jnp.float32)).reshape(1, L, H, D)
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2, 3)))(
            q, k, v, sink
        ), jax.jit(f)(q, k, v, sink)

    return worst(vg(ring), vg(dense))


def layer_hands_ids_to_ring() -> float:
    """An NNX attention layer whose attention_fn calls ring_attention_sharded: the
    layer's segment_ids reach the ring, as they reach dot_product_attention."""
    from flax import nnx

    import stablelayers.nnx as sln

    mesh = Mesh(np.array(jax.devices()[:4]), ("sp",))
    x = jax.random.normal(jax.random.key(3), (B, L, 16))
    ids = jnp.asarray(np.repeat(np.arange(4), [10, 30, 16, 8])[None].repeat(B, 0))

    def ring_fn(q, k, v, bias=None, mask=None, **unused):
        return sl.ring_attention_sharded(q, k, v, mesh=mesh, axis_name="sp", is_causal=True)

    def one_device(q, k, v, bias=None, mask=None, **unused):
        return sl.dot_product_attention(q, k, v, is_causal=True)

    layer = sln.MultiHeadAttention(H, 16, attention_fn=ring_fn, decode=False, rngs=nnx.Rngs(0))
    ring = layer(x, segment_ids=ids)
    layer.attention_fn = one_device
    return rel(ring, layer(x, segment_ids=ids))


def inside_shard_map() -> float:
    """ring_attention called by the user inside shard_map (check_vma on), heads and batch
    split too, lse returned."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "sp"))
    q, k, v = (jax.random.normal(jax.random.key(i), (B, L, H, D)) for i in range(3))
    order = sl.zigzag_order(L, 4)
    spec = P("data", "sp")

    def local(q, k, v):
        o, lse = sl.ring_attention(
            q, k, v, axis_name="sp", is_causal=True, layout="zigzag", return_logsumexp=True
        )
        return o, lse

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, P("data", None, "sp"))
    )

    def ring(q, k, v):
        o, lse = f(*(x[:, order] for x in (q, k, v)))
        back = np.argsort(order)
        return o[:, back], lse[..., back]

    def dense(q, k, v):
        return sl.dot_product_attention(q, k, v, is_causal=True, return_logsumexp=True)

    def vg(fn):
        return jax.jit(
            jax.value_and_grad(
                lambda *a: sum(jnp.sum(jnp.sin(x)) for x in fn(*a)), argnums=(0, 1, 2)
            )
        )(q, k, v)

    return worst(vg(ring), vg(dense))


def sharded_ops() -> dict[str, float]:
    """Every public op under jit with NamedSharding inputs split by batch, heads, sequence."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("batch", "seq", "heads"))
    x = jax.random.normal(jax.random.key(5), (4, 16, 8, 32))  # (batch, seq, heads, dim)
    out = {}
    ops = {
        "softmax": lambda a: sl.softmax(a, axis=-1),
        "log_softmax": lambda a: sl.log_softmax(a, axis=-1),
        "masked_softmax": lambda a: sl.masked_softmax(a, where=a > -0.5, axis=-1),
        "softplus": sl.softplus,
    }
    spec = NamedSharding(mesh, P("batch", "seq", "heads"))
    for name, op in ops.items():
        f = jax.jit(jax.value_and_grad(lambda a, op=op: jnp.sum(jnp.sin(op(a)))))
        out[name] = worst(f(jax.device_put(x, spec)), f(x))
    q, k, v = (jax.random.normal(jax.random.key(i), (4, 64, 8, 8)) for i in range(3))
    for impl in ("dense", "chunked"):
        f = jax.jit(
            jax.value_and_grad(
                lambda q, k, v, impl=impl: jnp.sum(
                    jnp.sin(
                        sl.dot_product_attention(
                            q, k, v, is_causal=True, implementation=impl, chunk_size=16
                        )
                    )
                ),
                argnums=(0, 1, 2),
            )
        )
        put = [jax.device_put(a, spec) for a in (q, k, v)]
        out[f"attention_{impl}"] = worst(f(*put), f(q, k, v))
    from flax import nnx

    from stablelayers import nnx as slnnx

    m = slnnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(9), (4, 16, 32))
    f = nnx.jit(lambda m, a: m(a))
    out["nnx_layer"] = rel(
        f(m, jax.device_put(xs, NamedSharding(mesh, P("batch", "seq")))), f(m, xs)
    )
    import equinox as eqx

    from stablelayers import equinox as sleqx
    from stablelayers import linen as sllinen

    lin = sllinen.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
    params = lin.init(jax.random.key(1), xs)
    g = jax.jit(lambda p, a: lin.apply(p, a))
    sharded_xs = jax.device_put(xs, NamedSharding(mesh, P("batch", "seq")))
    out["linen_layer"] = rel(g(params, sharded_xs), g(params, xs))
    eq = sleqx.MultiHeadAttention(4, 32, key=jax.random.key(2))
    h = eqx.filter_jit(lambda m, a: jax.vmap(lambda r: m(r, r, r))(a))
    out["equinox_layer"] = rel(h(eq, sharded_xs), h(eq, xs))
    return out


def memory_per_device() -> dict[str, float]:
    """Causal value-and-grad at 32768 tokens, as benchmarks/scaling.py measures it: the
    compiled per-device program (arguments + outputs + temporaries) of ring_attention on
    8 devices, data in the zigzag layout, against the one-device chunked program's; and
    whether any array of ring_attention_sharded's program (at 8192 tokens; it lays the
    data out itself) spans the whole sequence."""
    mesh = Mesh(np.array(jax.devices()), ("seq",))
    spec = P(None, "seq")
    sharded = NamedSharding(mesh, spec)

    def local(q, k, v):
        return sl.ring_attention(q, k, v, axis_name="seq", is_causal=True, layout="zigzag")

    def ring_sharded(q, k, v):
        return sl.ring_attention_sharded(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)

    def one(q, k, v):
        return sl.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")

    def compiled(f, shardings, length):
        shape = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
        step = jax.value_and_grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
        return jax.jit(step, in_shardings=shardings).lower(shape, shape, shape).compile()

    def total(c) -> int:
        m = c.memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes

    ring = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    ratio = total(compiled(ring, (sharded,) * 3, 32768)) / total(compiled(one, None, 32768))
    hlo = compiled(ring_sharded, (sharded,) * 3, 8192).as_text()
    whole = ",8192," in hlo or "[1,8192," in hlo
    return {"memory_ratio_8": ratio, "whole_seq": whole}


def main() -> None:
    results = {
        f"ring_{n}_{'causal' if c else 'full'}": ring_vs_dense(n, c)
        for n in (4, 8)
        for c in (False, True)
    }
    results["inside_shard_map"] = inside_shard_map()
    results["layer_hands_ids_to_ring"] = layer_hands_ids_to_ring()
    for layout in ("contiguous", "zigzag"):
        for c in (False, True):
            results[f"packed_{layout}_{'causal' if c else 'full'}"] = packed_ring(layout, c)
    results.update(sharded_ops())
    results.update(memory_per_device())
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
