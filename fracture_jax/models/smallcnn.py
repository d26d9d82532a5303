"""A small VGG-style CNN (four blocks of two conv-BN-ReLU): no pretrained weights; for tests,
baselines and the CPU demo."""

import flax.linen as nn
import jax.numpy as jnp

from fracture_jax.models import layers as L


# Keras' 0.99 lets the moving statistics trail far behind weights that change fast from
# random init; at 0.9 they follow within tens of steps.
BN_MOMENTUM = 0.9


class SmallCNN(nn.Module):
    """RGB 0-255 in (scaled to 0-1 inside), feature map (N, H/16, W/16, ``8 * width``) out."""

    width: int = 16
    frozen: frozenset = frozenset()  # the frozen layers' names
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = (x.astype(jnp.float32) / 255.0).astype(self.dtype)
        for block in range(1, 5):
            for conv, stride in ((1, 1), (2, 2)):
                features = self.width * 2 ** (block - 1)
                name = f"block{block}_conv{conv}"
                x = L.Conv2D(features, 3, stride, "SAME", use_bias=False,
                             frozen=name in self.frozen, dtype=self.dtype, name=name)(x)
                bn = f"block{block}_bn{conv}"
                x = L.BatchNormalization(momentum=BN_MOMENTUM, axis_name=self.axis_name,
                                         frozen=bn in self.frozen, dtype=self.dtype,
                                         name=bn)(x, train)
                x = L.relu(x)
        return x
