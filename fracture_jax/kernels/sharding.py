"""Custom gradients and native calls inside ``jax.shard_map``.

There, the activations are split over the mesh's manual axes ("varying") and the parameters
are replicated ("invariant"). A custom VJP must hand back each gradient with its input's type,
and a native call takes operands of one type and returns results JAX sees as invariant. So a
parameter that meets an activation in such a function is first cast to varying (JAX then sums
its gradient over the devices, as for any replicated parameter), and a native call's results
are cast to varying too: ``per_device`` does both, with public JAX only.
"""

import jax
from jax import lax


def manual_axes() -> tuple:
    """The mesh axes a ``shard_map`` being traced is manual over (none outside one)."""
    return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def per_device(v):
    """A replicated value (a parameter, a native call's result) typed as varying over the
    manual axes, as the activations are; unchanged outside ``shard_map``."""
    axes = manual_axes()
    return lax.pcast(v, axes, to="varying") if axes else v
