"""A backbone with global average pooling, and optionally the seed's one-logit head."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fracture_jax.models import layers as L
from fracture_jax.models.registry import get_spec


class FractureClassifier(nn.Module):
    """RGB 0-255 images (N, H, W, 3) -> pooled features (N, C), or a fractured logit (N,).

    With ``include_head`` the seed's head follows the pooling: dropout, then one dense unit
    (``fracture_logit``) whose sigmoid is the probability of *fractured*. ``frozen`` names the
    frozen backbone layers (``freezing.frozen_layers``).
    With ``pooled_inputs`` the inputs are already pooled backbone features (N, C): only the
    head runs (training on cached features).
    """

    model: str = "efficientnetb2"
    include_head: bool = True
    dropout_rate: float = 0.2
    frozen: frozenset = frozenset()
    imagenet_rescaling: bool = False
    pooled_inputs: bool = False
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    def backbone(self):
        spec = get_spec(self.model)
        kw = dict(frozen=self.frozen, axis_name=self.axis_name, dtype=self.dtype, name="backbone")
        if spec.std_rescaling:
            kw["imagenet_rescaling"] = self.imagenet_rescaling
        return spec.build(**kw)

    @nn.compact
    def __call__(self, images, train: bool = False, return_maps: bool = False):
        if self.pooled_inputs:
            feats, maps = images, None
        else:
            # marked, so that d(logit)/d(maps) is a perturbation's gradient (Grad-CAM)
            maps = self.perturb("maps", self.backbone()(images, train))
            feats = L.global_avg_pool(maps)
        if not self.include_head:
            return (feats, maps) if return_maps else feats
        x = nn.Dropout(self.dropout_rate, name="head_dropout")(feats, deterministic=not train)
        logits = L.Dense(1, name="fracture_logit")(x)[:, 0]
        return (logits, maps) if return_maps else logits


def backbone_layers(model: str, image_size: int = 32) -> tuple[str, ...]:
    """The backbone's layers with weights, in Keras' order: the one place that order comes from
    (the layers record themselves as they are built, ``layers.layers_built``)."""
    module = FractureClassifier(model=model, include_head=False)
    with L.layers_built() as names:
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    return tuple(names)
