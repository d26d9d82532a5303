"""Data-parallel forward passes: a jitted logit function and a pass over a whole split that
scores every example exactly once, whatever the device count and batch size."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fracture_jax import parallel
from fracture_jax.augment import model_input
from fracture_jax.data.pipeline import eval_dataset


def _mean_probability_logit(a, b):
    """The logit of (sigmoid(a) + sigmoid(b)) / 2, computed in log space (no overflow)."""
    log_p = jnp.logaddexp(jax.nn.log_sigmoid(a), jax.nn.log_sigmoid(b))
    log_q = jnp.logaddexp(jax.nn.log_sigmoid(-a), jax.nn.log_sigmoid(-b))
    return log_p - log_q


def make_forward(model, mesh, image_size: int | None = None, flip: bool = False):
    """jit(shard_map): (variables, images) -> logits in inference mode; uint8 or float images
    are resized on the device to ``image_size`` where they differ (``augment.model_input``).
    With ``flip`` (test-time augmentation) the logit of the mean probability of the image and
    its mirror. Without ``image_size`` the inputs go to the model as they are (features)."""

    def forward(variables, images):
        if image_size is not None:
            images = model_input(images, image_size)
        logits = model.apply(variables, images, train=False)
        if flip:
            logits = _mean_probability_logit(logits, model.apply(variables, images[:, :, ::-1],
                                                                  train=False))
        return logits

    return jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P(), P(parallel.AXIS)),
                                 out_specs=P(parallel.AXIS)))


def mesh_multiple(batch_size: int, mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's device count."""
    return math.ceil(batch_size / mesh.size) * mesh.size


def predict(forward, variables, source, batch_size: int, mesh, num_workers: int = 0,
            prefetch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every example of the decoded ``source`` once, in order. The batch
    is rounded up to a multiple of the device count; padding is masked out."""
    batch_size = mesh_multiple(batch_size, mesh)
    batches = iter(eval_dataset(source, batch_size, num_workers, prefetch))
    try:
        return predict_batches(forward, variables, batches, mesh)
    finally:
        batches.close()


def predict_batches(forward, variables, batches, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, labels) of ``forward`` over ``{"image", "label", "mask", "index"}`` batches
    whose size splits over the mesh, gathered from every process, the masked-out padding
    dropped, in the order of ``index`` (each process reads its own share of the examples)."""
    parts = {"out": [], "label": [], "mask": [], "index": []}
    for batch in batches:
        device = parallel.shard_batch(batch, mesh)
        device["out"] = forward(variables, device.pop("image"))
        for k, v in parts.items():
            v.append(parallel.to_host(device[k]))
    found = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(found["index"][found["mask"]], kind="stable")
    return found["out"][found["mask"]][order], found["label"][found["mask"]][order]
