"""VGG16 as ``keras.applications.VGG16`` builds it (no top), caffe preprocessing inside."""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from fracture_jax.models import layers as L
from fracture_jax.models.resnet import caffe_preprocess

STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(nn.Module):
    """VGG16 feature extractor: RGB 0-255 in, last feature map (N, h, w, 512) out.

    ``frozen`` names the frozen layers. VGG16 has no BatchNorm, so ``train`` and ``axis_name``
    change nothing; they keep the backbone interface uniform.
    """

    frozen: frozenset = frozenset()
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = caffe_preprocess(x)
        if self.frozen:
            x = lax.stop_gradient(x)
        x = x.astype(self.dtype)
        for block, (features, convs) in enumerate(STAGES, start=1):
            for i in range(1, convs + 1):
                name = f"block{block}_conv{i}"
                x = L.Conv2D(features, 3, padding="SAME", activation="relu",
                             frozen=name in self.frozen, dtype=self.dtype, name=name)(x)
            x = L.max_pool(x, 2, 2)
        return x
