"""Data parallelism: one device mesh axis `data` over every device of every process.

Used by training, evaluation, embedding and search alike, so it sits below all of them.

The state is replicated (`P()`), batches are split along their first axis (`P('data')`).
`jax.jit` then inserts the cross-device reductions itself (batch-norm statistics, the loss
means, the gradients), so the step is written as if for one device. Each device receives a
contiguous block of rows; with P divisible by the device count that is whole identity
groups, which keeps the per-device work balanced (the mining still sees the global batch).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ctl_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all (or the first `num_devices`) devices, across processes.

    Devices are ordered by process, so process k's devices hold the k-th contiguous block of
    every batch: exactly the rows its input pipeline reads (`process_index` k of
    `pipeline.make_train_iterator`), whatever order `jax.devices()` lists them in.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} exist")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("a multi-process run uses every device of every process")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_layout(num_identities: int, num_instances: int, mesh: Mesh) -> None:
    """Every device must get whole identity groups (docs/method.md, 'The P x M sampler')."""
    n = mesh.devices.size
    if num_identities % n:
        raise ConfigError(
            f"data.num_identities (P={num_identities}) must be divisible by the number of "
            f"devices ({n}) so that every device receives whole identity groups"
        )
    if num_identities % jax.process_count():
        raise ConfigError(
            f"data.num_identities (P={num_identities}) must be divisible by the number of "
            f"processes ({jax.process_count()})"
        )


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's rows of the global batch into global arrays sharded on `data`.

    Args:
      local_batch: numpy arrays whose first axis holds this process's contiguous share of the
        global batch (all of it in a single-process run).
    """
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in local_batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicate(tree, mesh: Mesh):
    """Places a host pytree (identical in every process) replicated on the mesh."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: x[idx]), tree
    )


def to_host(tree):
    """Fetches a (possibly sharded, possibly multi-process) pytree as numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
