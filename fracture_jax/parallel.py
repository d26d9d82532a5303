"""The device mesh, moving host batches onto it (one 'batch' axis over all devices) and back,
and what the processes of a multi-process run agree on."""

import contextlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def shard_batch(batch: dict, mesh: Mesh, stacked: bool = False) -> dict:
    """This process's slice of the global batch -> global arrays split over the 'batch' axis
    (``stacked``: several batches, (n, batch, ...), split on their second axis)."""
    sharding = NamedSharding(mesh, P(None, AXIS) if stacked else P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    """A pytree copied onto every device (from host copies, so nothing aliases the input)."""
    return jax.device_put(jax.tree.map(np.asarray, tree), NamedSharding(mesh, P()))


def to_host(x) -> np.ndarray:
    """The whole value of a global array as numpy, on every process: a gather across processes
    where this one holds only its part."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process must call this together)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


@contextlib.contextmanager
def first_process_first(name: str):
    """The block runs on process 0, then on the others (files they all read, made once)."""
    waits = jax.process_count() > 1 and jax.process_index() != 0
    if waits:
        multihost_utils.sync_global_devices(name)
    yield
    if jax.process_count() > 1 and not waits:
        multihost_utils.sync_global_devices(name)
