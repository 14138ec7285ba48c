"""Where arrays live: one device, or data parallel over every local device."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding


class Placement:
    """Puts parameters and batches on devices.

    Data parallel: a one-axis ``Mesh`` named ``"data"`` over ``jax.local_devices()``;
    parameters and optimiser state are replicated (``PartitionSpec()``) and each batch is
    split along its first axis (``PartitionSpec("data")``). ``jax.jit`` then runs the
    same program on every device and inserts the all-reduce of the gradients itself, so
    the training step needs no change.


    Context parallel (``context_parallel=N``): a one-axis ``Mesh`` named ``"seq"`` over
    the first ``N`` local devices; parameters and batches are replicated, and the model's
    attention (``stablelayers.ring_attention_sharded``) splits the sequence over ``"seq"``
    inside ``shard_map``.

    Tensor parallel (``tensor_parallel=N``): likewise over a mesh axis ``"tp"``, which the
    model's head (``LMHead(vocab_axis="tp")``) splits the vocabulary over.
    """

    def __init__(
        self, data_parallel: bool = False, context_parallel: int = 1, tensor_parallel: int = 1
    ):
        devices = jax.local_devices()
        self.data_parallel = data_parallel
        self.context_parallel = context_parallel
        self.tensor_parallel = tensor_parallel
        self.num_devices = len(devices) if data_parallel else 1
        split = max(context_parallel, tensor_parallel)
        if split > 1:
            flag = "--context-parallel" if context_parallel > 1 else "--tensor-parallel"
            if len(devices) < split:
                raise SystemExit(
                    f"{flag} {split} needs {split} devices, "
                    f"found {len(devices)}; on CPU set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={split}."
                )
            axis = "seq" if context_parallel > 1 else "tp"
            mesh = Mesh(np.array(devices[:split]), (axis,))
            self.replicated = self.sharded = self.stacked = NamedSharding(mesh, PartitionSpec())
        elif data_parallel:
            mesh = Mesh(np.array(devices), ("data",))
            self.replicated = NamedSharding(mesh, PartitionSpec())
            self.sharded = NamedSharding(mesh, PartitionSpec("data"))
            self.stacked = NamedSharding(mesh, PartitionSpec(None, "data"))
        else:
            self.replicated = self.sharded = self.stacked = SingleDeviceSharding(devices[0])

    def describe(self) -> str:
        if self.context_parallel > 1:
            platform = jax.local_devices()[0].platform
            return f"context parallel over {self.context_parallel} {platform} devices"
        if self.tensor_parallel > 1:
            platform = jax.local_devices()[0].platform
            return f"vocabulary split over {self.tensor_parallel} {platform} devices"
        if not self.data_parallel:
            return f"1 device ({jax.local_devices()[0].platform})"
        return (
            f"data parallel over {self.num_devices} {jax.local_devices()[0].platform} devices"
        )

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.num_devices:
            raise SystemExit(
                f"--batch-size {batch_size} must be a multiple of the {self.num_devices} "
                "devices for --data-parallel."
            )

    def params(self, tree: Any) -> Any:
        """Parameters, optimiser state and other trees every device needs whole."""
        return jax.device_put(tree, self.replicated)

    def batch(self, tree: Any) -> Any:
        """A batch (NumPy arrays with the batch first), split over the devices."""
        return jax.device_put(tree, self.sharded)

    def batches(self, tree: Any) -> Any:
        """Batches stacked along a new first axis, each split over the devices."""
        return jax.device_put(tree, self.stacked)
