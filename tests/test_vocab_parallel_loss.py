"""The vocabulary-parallel fused loss (issue 25): linear_softmax_cross_entropy with
``axis_name`` inside shard_map, and linear_softmax_cross_entropy_sharded for jit users.

The 4- and 8-device checks run in one subprocess under
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/_vocab_parallel_checks.py:
the device count is fixed when JAX starts) and report their worst relative errors, which
are asserted here; the one-device mesh checks run in this process, x64 on and off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import stablelayers as sl

SCRIPT = Path(__file__).with_name("_vocab_parallel_checks.py")
TOL = 5e-6  # float32 rounding of sums taken in another order


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_ENABLE_X64", None)
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("config", ["all", "traced", "out_of_range"])
def test_vocab_sharded_equals_one_device_8(results, reduction, config):
    # Values and dh, dW, db on 8 devices (48 columns each, blocks of 20 that do not
    # divide them) against one device: 'all' is z-loss, smoothing, soft-cap,
    # ignore_index (one ignored token's features NaN) and a vocab_mask with a label on a
    # masked class; 'traced' takes the three options as traced scalars and checks their
    # gradients too; 'out_of_range' has labels V and -1, NaN exactly where one device's.
    assert results[f"eq_8_{reduction}_{config}"] < TOL


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_vocab_sharded_equals_one_device_4(results, reduction):
    assert results[f"eq_4_{reduction}_all"] < TOL


@pytest.mark.parametrize(
    "how",
    [
        "entry",
        "mean",
        "user_vma",
        "user_novma",
        "user_sum_vma",
        "user_sum_novma",
        "traced_sum_vma",
        "traced_sum_novma",
    ],
)
def test_data_by_vocab_mesh(results, how):
    # A 2 x 4 (data, tp) mesh: the entry point with token_axis, and the user's own
    # shard_map with check_vma on and off, per token and summed (the summed op on each
    # device), with traced smoothing, z-loss and soft-cap as replicated inputs (their
    # gradients too).
    assert results[f"data_vocab_{how}"] < TOL


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_forward_mode_on_four_devices(results, reduction):
    assert results[f"forward_mode_{reduction}"] < TOL


@pytest.mark.parametrize("devices", [4, 8])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("part", ["value", "grad"])
def test_no_full_vocabulary_gather(results, devices, reduction, part):
    # No all-gather or all-to-all in the compiled program has the whole vocabulary as a
    # dimension of its result; the control shows the pattern finds GSPMD's gather.
    assert results[f"gathers_{devices}_{reduction}_{part}"] == 0
    assert results["control_gathers"] > 0


def _one_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("tp",))


def test_one_device_mesh_equals_plain_call(x64):
    # In this process (x64 on and off): a 1-device vocabulary axis is the plain loss.
    k = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.float64 if x64 else jnp.float32
    h = jax.random.normal(k[0], (10, 6), dtype)
    w = jax.random.normal(k[1], (6, 30), dtype)
    y = jax.random.randint(k[2], (10,), 0, 30).at[0].set(-100)
    kw = dict(label_smoothing=0.2, z_loss=1e-2, logits_soft_cap=3.0, ignore_index=-100)

    def sharded(h, w):
        return sl.linear_softmax_cross_entropy_sharded(
            h, w, y, mesh=_one_device_mesh(), axis_name="tp", reduction="mean", **kw
        )

    def plain(h, w):
        return sl.linear_softmax_cross_entropy(h, w, y, reduction="mean", **kw)

    got = jax.value_and_grad(sharded, argnums=(0, 1))(h, w)
    want = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            a, b, rtol=1e-12 if x64 else 1e-5, atol=1e-12 if x64 else 1e-6
        )


def test_outside_shard_map_says_what_to_do():
    x = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"inside jax\.shard_map"):
        sl.linear_softmax_cross_entropy(x, jnp.zeros((3, 8)), jnp.zeros(4, int), axis_name="tp")


def test_entry_point_checks():
    mesh = _one_device_mesh()
    h, w, y = jnp.zeros((4, 3)), jnp.zeros((3, 8)), jnp.zeros(4, int)
    with pytest.raises(ValueError, match="not an axis"):
        sl.linear_softmax_cross_entropy_sharded(h, w, y, mesh=mesh, axis_name="vocab")
    with pytest.raises(TypeError, match="Unknown keywords"):
        sl.linear_softmax_cross_entropy_sharded(h, w, y, mesh=mesh, axis_name="tp", where=1)


def test_inside_shard_map_on_one_device():
    # check_vma on: the loop carries are cast to the inputs' device-varying types.
    mesh = _one_device_mesh()
    h = jnp.ones((4, 3))
    w = jnp.arange(24.0).reshape(3, 8) / 10
    y = jnp.arange(4)

    def local(h, w, y):
        return sl.linear_softmax_cross_entropy(h, w, y, axis_name="tp", chunk_size=3)

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "tp"), P()), out_specs=P())
    np.testing.assert_allclose(f(h, w, y), sl.linear_softmax_cross_entropy(h, w, y), rtol=1e-6)


@pytest.mark.parametrize("framework", ["nnx", "linen", "equinox"])
def test_lm_head_vocab_axis(results, framework):
    # LMHead(vocab_axis="tp", token_axis="data", mesh=...) on a 2 x 4 mesh, parameters
    # placed by Flax's partitioning metadata (by hand for Equinox): the mean loss and its
    # gradients equal the same head's without vocab_axis.
    assert results[f"layer_{framework}"] < TOL


def test_lm_head_token_axis_needs_vocab_axis():
    from stablelayers import equinox as sleqx

    with pytest.raises(ValueError, match="need a `vocab_axis`"):
        sleqx.LMHead(3, 8, key=jax.random.key(0), token_axis="data")
