"""Grad-CAM (Selvaraju et al., 2017): where in the image the fractured logit comes from.

The classifier marks its last feature maps with ``perturb('maps')``, so the gradient of the
logit with respect to them is the gradient with respect to a zero perturbation.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnums=0)
def grad_cam(model, variables: dict, images) -> tuple[jax.Array, jax.Array]:
    """(heat maps (N, H, W) in [0, 1] at the image size, logits (N,)) in inference mode."""
    _, maps = model.apply(variables, images, train=False, return_maps=True)

    def logit_sum(perturbation):
        logits = model.apply(variables | {"perturbations": {"maps": perturbation}}, images,
                             train=False)
        return logits.sum(), logits

    grads, logits = jax.grad(logit_sum, has_aux=True)(jnp.zeros_like(maps))
    weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # (N, C): pooled gradients
    cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", maps.astype(jnp.float32), weights))
    cam = jax.image.resize(cam, (cam.shape[0],) + images.shape[1:3], "bilinear")
    peak = cam.max(axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0), logits
