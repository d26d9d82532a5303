"""The device mesh and moving host batches onto it (one 'batch' axis over all devices)."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's slice of the global batch -> global arrays split over the 'batch' axis."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    """A pytree copied onto every device (from host copies, so nothing aliases the input)."""
    return jax.device_put(jax.tree.map(np.asarray, tree), NamedSharding(mesh, P()))
