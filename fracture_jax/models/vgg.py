"""VGG16 as ``keras.applications.VGG16`` builds it (no top), caffe preprocessing inside."""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from fracture_jax.models import layers as L
from fracture_jax.models.resnet import caffe_preprocess

STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(nn.Module):
    """VGG16 feature extractor: RGB 0-255 in, last feature map (N, h, w, 512) out.

    ``frozen`` is the number of leading conv layers that are frozen. VGG16 has no BatchNorm,
    so ``train`` and ``axis_name`` change nothing; they keep the backbone interface uniform.
    """

    frozen: int = 0
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = caffe_preprocess(x)
        if self.frozen > 0:
            x = lax.stop_gradient(x)
        x = x.astype(self.dtype)
        n = 0
        for block, (features, convs) in enumerate(STAGES, start=1):
            for i in range(1, convs + 1):
                x = L.Conv2D(features, 3, padding="SAME", activation="relu",
                             frozen=n < self.frozen, dtype=self.dtype,
                             name=f"block{block}_conv{i}")(x)
                n += 1
            x = L.max_pool(x, 2, 2)
        return x
