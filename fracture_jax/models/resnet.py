"""ResNet50 (v1) as ``keras.applications.ResNet50`` builds it (no top).

Keras' "caffe" preprocessing (RGB to BGR, minus the ImageNet channel means) runs inside.
"""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from fracture_jax.models import layers as L

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
STAGES = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))


def caffe_preprocess(x):
    """``imagenet_utils.preprocess_input(mode="caffe")``: RGB 0-255 -> BGR minus means."""
    return x.astype(jnp.float32)[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)


class ResNet50(nn.Module):
    """ResNet50 v1 feature extractor: RGB 0-255 in, last feature map (N, h, w, 2048) out.

    ``frozen`` names the frozen layers.
    """

    frozen: frozenset = frozenset()
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        def conv(name, features, k, stride=1, padding="VALID"):
            return L.Conv2D(features, k, stride, padding, frozen=name in self.frozen,
                            dtype=self.dtype, name=name)

        def bn(name):
            return L.BatchNormalization(epsilon=1.001e-5, axis_name=self.axis_name,
                                        frozen=name in self.frozen, dtype=self.dtype, name=name)

        def conv_bn(name, x, features, k, stride=1, padding="VALID", **tail):
            return L.conv_bn(conv(name + "_conv", features, k, stride, padding), bn(name + "_bn"),
                             x, train, **tail)

        x = caffe_preprocess(x)
        if self.frozen:
            x = lax.stop_gradient(x)
        # Keras' ZeroPadding2D(3) before the stem, as the convolution's own padding.
        x = conv_bn("conv1", x.astype(self.dtype), 64, 7, 2, ((3, 3), (3, 3)), activation="relu")
        x = L.max_pool(L.zero_pad(x, ((1, 1), (1, 1))), 3, 2)
        for stage, filters, blocks, stride in STAGES:
            for i in range(1, blocks + 1):
                name = f"{stage}_block{i}"
                s = stride if i == 1 else 1
                y = conv_bn(name + "_1", x, filters, 1, s, activation="relu")
                y = conv_bn(name + "_2", y, filters, 3, 1, "SAME", activation="relu")
                if i == 1:  # built in Keras' layer order: 0_conv, 3_conv, 0_bn, 3_bn
                    conv0 = conv(name + "_0_conv", 4 * filters, 1, s)
                    conv3 = conv(name + "_3_conv", 4 * filters, 1)
                    bn0, bn3 = bn(name + "_0_bn"), bn(name + "_3_bn")
                    shortcut = L.conv_bn(conv0, bn0, x, train)
                    x = L.conv_bn(conv3, bn3, y, train, residual=shortcut, activation="relu")
                else:
                    x = conv_bn(name + "_3", y, 4 * filters, 1, residual=x, activation="relu")
        return x
