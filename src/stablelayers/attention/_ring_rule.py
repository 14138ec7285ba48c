"""Ring attention: the sequence split over a mesh axis, keys and values passed round a ring.

Inside ``shard_map``, each of the ``N`` devices on ``axis_name`` holds ``L / N`` queries,
keys and values. Every local block is two equal *chunks* of the global sequence (``2N``
chunks of ``C = L / 2N`` positions in all): chunks ``2d`` and ``2d + 1`` on device ``d``
in the ``"contiguous"`` layout, chunks ``d`` and ``2N - 1 - d`` in the ``"zigzag"`` one.
For ``N`` steps each device continues the chunked online softmax (``_chunked_rule``)
of its two query chunks over the two key chunks it holds, in place (which is the
logsumexp merge of the partial results), then passes its keys and values to the next
device with ``lax.ppermute``; after ``N`` moves they are home again.

Causal attention: the chunked path compares query ``q`` of chunk ``qc`` with key ``k`` of
chunk ``kc`` at ``q + (qc - kc) C`` and ``k``, so a chunk pair is skipped (every key after
every query: its block loops are empty), causal on its diagonal, or full, with no branch.
In the zigzag layout every device does the same work at every step: with its own keys,
two diagonal pairs and one full pair; with another device's, exactly two full pairs
(chunk ``d`` sees the lower of the other device's chunks exactly when ``2N - 1 - d`` does
not see the upper). In the contiguous layout device ``N - 1`` does ``N`` times device 0's.

The ``custom_vjp`` keeps the queries, the keys and values (those that came home), the
output and one logsumexp per row. Its backward pass computes each row's terms once (the
output is then dropped) and rotates again: keys, values and their gradients travel round
the ring, each device adds its queries' share to them (FlashAttention-2's backward with
the global logsumexp), and after ``N`` steps each gradient is back on its key's device.

Memory: each device holds its queries, output rows, dq, and the two key chunks, value
chunks and their gradients it is working on, all summed in place; a step's sends go one
array after the other once the step's work is done (so one block is in flight at a time).
On accelerators this gives up overlapping the sends with the next step's work, which would
hold a second copy of every travelling block.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
from jax import lax

from stablelayers._core.arithmetic import compute_dtype
from stablelayers._core.define_op import define_op
from stablelayers.attention import _chunked_rule as ca
from stablelayers.attention import _sharding
from stablelayers.attention._arguments import Inputs

T = TypeVar("T")
Pair = tuple[jax.Array, jax.Array]  # one array per chunk of the local block


class RingConfig(NamedTuple):
    """The static part of a call."""

    inner: ca.Config  # the chunked path's, causal if the attention is
    axis_name: str
    size: int  # devices on the ring
    chunk: int  # positions per chunk, two chunks per device
    zigzag: bool


class Chunks(NamedTuple):
    """The ring's arguments, each array a pair (one per chunk of the local block): q
    ``(B, Hkv, G, C, D)``, k ``(B, Hkv, C, D)``, v ``(B, Hkv, C, Dv)``; sink ``(B, Hkv,
    G)`` or None; the global lengths ``(B,)`` (None only in the cotangent); the segment
    ids of the queries and keys, each ``(B, C)`` int32, or None. Key ids travel round
    the ring with their keys."""

    q: Pair
    k: Pair
    v: Pair
    sink: jax.Array | None
    q_len: jax.Array | None
    kv_len: jax.Array | None
    q_seg: Pair | None = None
    kv_seg: Pair | None = None

    def lengths(self) -> tuple[jax.Array, jax.Array]:
        """``(q_len, kv_len)``, which the arguments always hold."""
        assert self.q_len is not None and self.kv_len is not None
        return self.q_len, self.kv_len


class Residuals(NamedTuple):
    """What the backward pass keeps: the arguments, with the keys and values that came
    home round the ring, and each query chunk's output and logsumexp."""

    chunks: Chunks
    out: Pair
    lse: Pair


def chunk_ids(cfg: RingConfig, device: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Global chunk indices of the two chunks that ``device`` holds."""
    if cfg.zigzag:
        return device, 2 * cfg.size - 1 - device
    return 2 * device, 2 * device + 1


def _lens(lengths: jax.Array, chunk_id: jax.Array, chunk: int) -> jax.Array:
    """Per batch entry, the valid positions of a chunk (global lengths made local)."""
    return jnp.clip(lengths - chunk_id * chunk, 0, chunk).astype(jnp.int32)


def _pair(
    cfg: RingConfig,
    q: jax.Array,
    chunks: tuple[jax.Array, jax.Array],
    k: jax.Array,
    v: jax.Array,
    lengths: tuple[jax.Array, jax.Array],
    segments: tuple[jax.Array | None, jax.Array | None] = (None, None),
) -> Inputs:
    """The chunked path's inputs for query chunk ``qc`` against key chunk ``kc``
    (``chunks``): the global ``lengths`` made local, and query 0 placed at key position
    ``(qc - kc) C``. The causal mask then skips a pair whose keys all follow its queries
    (the loops over blocks are empty), masks the upper triangle of a diagonal pair and
    leaves whole a pair whose keys all precede its queries, with no branch. The pair's
    ``segments`` (query and key ids) skip the block pairs that share none."""
    (qc, kc), (q_len, kv_len) = chunks, lengths
    local = (_lens(q_len, qc, cfg.chunk), _lens(kv_len, kc, cfg.chunk))
    q_seg, kv_seg = segments
    return Inputs(
        q,
        k,
        v,
        None,
        None,
        None,
        *local,
        offset=(qc - kc) * cfg.chunk,
        q_segments=q_seg,
        kv_segments=kv_seg,
    )


def _ids(pair: Pair | None, index: int) -> jax.Array | None:
    """Chunk ``index``'s segment ids, or None."""
    return None if pair is None else pair[index]


def _after(tree: T, after: Any) -> T:
    """``tree`` unchanged, but computed only once every array of ``after`` is: each array
    plus a zero made from an element of each (``where(isfinite(t), t, 0) * 0``, which XLA
    cannot fold away for floats, and no NaN of ``after`` reaches ``tree``).

    XLA schedules by data dependence only: without this it starts a ring step's sends at
    the top of the loop body (and, to do so, copies every block in use, holding it twice
    through the step), and it makes a loop's zeros where the program starts."""
    t = sum(x.ravel()[0].astype(jnp.float32) for x in jax.tree.leaves(after))
    tie = jnp.where(jnp.isfinite(t), t, 0.0) * 0.0
    return cast(T, jax.tree.map(lambda x: x + tie.astype(x.dtype), tree))


def _rotate(cfg: RingConfig, tree: T, after: Any) -> T:
    """``tree`` sent to the next device on the ring once ``after`` is computed, one array
    after the other, so that a device holds one block in flight at a time, not all."""
    perm = [(i, (i + 1) % cfg.size) for i in range(cfg.size)]
    leaves, treedef = jax.tree.flatten(tree)
    sent: list[jax.Array] = []
    for x in leaves:
        sent.append(
            _sharding.ppermute(_after(x, sent[-1] if sent else after), cfg.axis_name, perm)
        )
    return cast(T, jax.tree.unflatten(treedef, sent))


def _forward(
    cfg: RingConfig, x: Chunks
) -> tuple[tuple[Pair, Pair], tuple[Pair, Pair, Pair | None]]:
    """``((out, lse), (k, v, kv_seg))``: each query chunk's online softmax, started from
    the sink (or from nothing) and continued over every chunk pair in place; and the keys,
    values and key ids after ``N`` moves round the ring, home again, which the backward
    pass keeps (so that no device holds a second copy of its own while they travel)."""
    me = lax.axis_index(cfg.axis_name)
    q_ids = chunk_ids(cfg, me)
    q, lengths = x.q, x.lengths()
    Carry = tuple[Pair, Pair, Pair | None, tuple[Pair, Pair]]

    def step(s: jax.Array, carry: Carry) -> Carry:
        k, v, kv_seg, acc = carry
        k_ids = chunk_ids(cfg, (me - s) % cfg.size)
        out = list(acc)
        for qi, ki in itertools.product(range(2), repeat=2):
            segments = (_ids(x.q_seg, qi), _ids(kv_seg, ki))
            chunks = (q_ids[qi], k_ids[ki])
            pair = _pair(cfg, q[qi], chunks, k[ki], v[ki], lengths, segments)
            out[qi] = ca.forward(cfg.inner, pair, state=out[qi])
        k, v, kv_seg = _rotate(cfg, (k, v, kv_seg), out)
        return k, v, kv_seg, (out[0], out[1])

    first, second = (ca.initial_state(cfg.inner, part, x.v[0], x.sink) for part in q)
    init = _sharding.match((first, second), x)
    carry = (x.k, x.v, x.kv_seg, init)
    k, v, kv_seg, acc = cast(Carry, lax.fori_loop(0, cfg.size, step, carry))
    (out0, lse0), (out1, lse1) = acc
    return ((out0, out1), (lse0, lse1)), (k, v, kv_seg)


def _primal(cfg: RingConfig, x: Chunks) -> tuple[Pair, Pair]:
    """``(out, lse)`` of the local queries in ``_chunked_rule``'s canonical layout, each a
    pair (one per chunk; see :class:`Chunks`). Empty rows have output 0 and logsumexp at
    the lowest float. Chunks are kept apart (never concatenated) so that no copy of the
    local block is made."""
    result, _ = _forward(cfg, x)
    return result


def _fwd(cfg: RingConfig, x: Chunks) -> tuple[tuple[Pair, Pair], Residuals]:
    """The forward rule: ``_primal``'s result, keeping the arguments and the result, but
    with the keys and values that came home round the ring in place of the inputs'."""
    (out, lse), (k, v, kv_seg) = _forward(cfg, x)
    return (out, lse), Residuals(x._replace(k=k, v=v, kv_seg=kv_seg), out, lse)


def _bwd(cfg: RingConfig, residuals: Residuals, cotangents: tuple[Pair, Pair]) -> tuple[Chunks]:
    """With the global output and logsumexp, each chunk pair's share of dq, dk and dv is
    FlashAttention-2's backward of that pair alone (``p = exp(s - lse)`` is the global
    probability, ``D = rowsum(dO * O) - d_lse`` the global row term); the shares add up.
    dq stays; dk and dv travel with their keys and values, home after ``N`` moves."""
    x, out, lse = residuals
    q, k, v, sink = x.q, x.k, x.v, x.sink
    d_out, d_lse = cotangents
    me = lax.axis_index(cfg.axis_name)
    q_ids = chunk_ids(cfg, me)
    # The row terms and the sink's gradient first: the output is not held past them.
    rows = [ca.row_terms(cfg.inner, *x) for x in zip(out, lse, d_out, d_lse, strict=True)]
    d_sink = None
    if sink is not None:
        # Summed over this device's rows, then over the devices that share the sink.
        first, second = rows
        d_sink = ca.sink_grad(sink, first) + ca.sink_grad(sink, second)
        d_sink = _sharding.sum_over_devices(d_sink, sink).astype(sink.dtype)
    Carry = tuple[Pair, Pair, Pair, Pair, Pair, Pair | None]

    def step(s: jax.Array, carry: Carry) -> Carry:
        d_q, k, v, d_k, d_v = (list(x) for x in carry[:5])
        kv_seg = carry[5]
        k_ids = chunk_ids(cfg, (me - s) % cfg.size)
        for qi, ki in itertools.product(range(2), repeat=2):
            chunks = (q_ids[qi], k_ids[ki])
            segments = (_ids(x.q_seg, qi), _ids(kv_seg, ki))
            pair = _pair(cfg, q[qi], chunks, k[ki], v[ki], x.lengths(), segments)
            grads = ca.Grads(d_q[qi], d_k[ki], d_v[ki], None)
            grads = ca.accumulate_grads(cfg.inner, pair, d_out[qi], rows[qi], grads)
            d_q[qi], d_k[ki], d_v[ki] = grads.d_q, grads.d_k, grads.d_v
        moving = _rotate(cfg, (_two(k), _two(v), _two(d_k), _two(d_v), kv_seg), d_q)
        return (_two(d_q), *moving)

    compute = compute_dtype(cfg.inner.dtype)
    zeros = _after([_two([jnp.zeros(a.shape, compute) for a in xs]) for xs in (q, k, v)], rows)
    zero_q, zero_k, zero_v = zeros
    init = _sharding.match((zero_q, k, v, zero_k, zero_v), residuals, cotangents)
    init_carry = (*init, x.kv_seg)
    d_q, _, _, d_k, d_v, _ = cast(Carry, lax.fori_loop(0, cfg.size, step, init_carry))
    grads = [
        _two([g.astype(a.dtype) for g, a in zip(*p, strict=True)])
        for p in ((d_q, q), (d_k, k), (d_v, v))
    ]
    d_q, d_k, d_v = grads
    return (Chunks(d_q, d_k, d_v, d_sink, None, None),)


def _two(xs: list[jax.Array] | Pair) -> Pair:
    """The two chunks' arrays as a pair."""
    return xs[0], xs[1]


# Reverse mode only, as the chunked path.
ring = define_op(_primal, fwd=_fwd, bwd=_bwd, nondiff_argnums=(0,))
