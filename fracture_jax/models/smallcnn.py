"""A small CNN (three conv-BN-ReLU blocks): no pretrained weights; for tests and baselines."""

import flax.linen as nn
import jax.numpy as jnp

from fracture_jax.models import layers as L


class SmallCNN(nn.Module):
    """RGB 0-255 in (scaled to 0-1 inside), feature map (N, h, w, ``width * 4``) out."""

    width: int = 16
    frozen: int = 0
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = (x.astype(jnp.float32) / 255.0).astype(self.dtype)
        n = 0
        for block, features in enumerate((self.width, 2 * self.width, 4 * self.width), start=1):
            x = L.Conv2D(features, 3, 2, "SAME", use_bias=False, frozen=n < self.frozen,
                         dtype=self.dtype, name=f"block{block}_conv")(x)
            x = L.BatchNormalization(axis_name=self.axis_name, frozen=n + 1 < self.frozen,
                                     dtype=self.dtype, name=f"block{block}_bn")(x, train)
            x = L.relu(x)
            n += 2
        return x
