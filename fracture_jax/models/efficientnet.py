"""EfficientNet B0-B7 as ``keras.applications.EfficientNetB*`` builds them (no top)."""

import math

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from fracture_jax.models import layers as L

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)

# (width, depth, default resolution, top dropout) per variant, as in Keras.
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5),
}

# kernel, repeats, filters in, filters out, expand ratio, stride (SE ratio 0.25, id skip on).
BLOCKS = (
    (3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1),
)
SE_RATIO = 0.25
DROP_CONNECT_RATE = 0.2


def round_filters(filters: float, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class EfficientNet(nn.Module):
    """EfficientNet feature extractor: RGB 0-255 in, last feature map (N, h, w, C) out.

    ``imagenet_rescaling`` adds the extra ``1/sqrt(std)`` scaling Keras inserts on its
    ``weights="imagenet"`` path (the published files store std where the variance belongs).
    ``frozen`` names the frozen layers.
    """

    variant: str = "b2"
    imagenet_rescaling: bool = False
    frozen: frozenset = frozenset()
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        width, depth, _, _ = VARIANTS[self.variant]
        def layer(cls, name, **kw):
            return cls(name=name, frozen=name in self.frozen, dtype=self.dtype, **kw)

        def bn(name):
            return layer(L.BatchNormalization, name, epsilon=1e-3, axis_name=self.axis_name)

        x = x.astype(jnp.float32) * jnp.float32(1.0 / 255.0)
        x = L.Normalization(name="normalization")(x)
        if self.imagenet_rescaling:
            x = x * jnp.asarray([1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB], jnp.float32)
        if self.frozen:
            x = lax.stop_gradient(x)
        x = x.astype(self.dtype)

        # Keras' ZeroPadding2D before each stride-2 convolution, as the convolution's padding.
        x = L.conv_bn(layer(L.Conv2D, "stem_conv", features=round_filters(32, width),
                            kernel_size=3, strides=2, padding=L.correct_pad(x, 3),
                            use_bias=False),
                      bn("stem_bn"), x, train, activation="swish")

        blocks_total = float(sum(round_repeats(b[1], depth) for b in BLOCKS))
        b = 0
        for i, (k, repeats, f_in, f_out, expand, stride) in enumerate(BLOCKS):
            f_in, f_out = round_filters(f_in, width), round_filters(f_out, width)
            for j in range(round_repeats(repeats, depth)):
                if j > 0:
                    stride, f_in = 1, f_out
                name = f"block{i + 1}{chr(j + 97)}_"
                drop = DROP_CONNECT_RATE * b / blocks_total
                inputs = x
                filters = f_in * expand
                if expand != 1:
                    x = L.conv_bn(layer(L.Conv2D, name + "expand_conv", features=filters,
                                        kernel_size=1, padding="SAME", use_bias=False),
                                  bn(name + "expand_bn"), x, train, activation="swish")
                x = L.conv_bn(layer(L.DepthwiseConv2D, name + "dwconv", kernel_size=k,
                                    strides=stride,
                                    padding=L.correct_pad(x, k) if stride == 2 else "SAME"),
                              bn(name + "bn"), x, train, activation="swish")
                filters_se = max(1, int(f_in * SE_RATIO))
                se = jnp.mean(x, axis=(1, 2), keepdims=True)
                se = layer(L.Conv2D, name + "se_reduce", features=filters_se, kernel_size=1,
                           padding="SAME", activation="swish")(se)
                se = nn.sigmoid(layer(L.Conv2D, name + "se_expand", features=filters,
                                      kernel_size=1, padding="SAME")(se))
                x = x * se
                project = layer(L.Conv2D, name + "project_conv", features=f_out, kernel_size=1,
                                padding="SAME", use_bias=False)
                project_bn = bn(name + "project_bn")
                if stride == 1 and f_in == f_out:
                    if train and drop > 0:
                        x = L.conv_bn(project, project_bn, x, train)
                        x = nn.Dropout(drop, broadcast_dims=(1, 2, 3), name=name + "drop")(
                            x, deterministic=False)
                        x = x + inputs
                    else:  # the residual joins the convolution's epilogue
                        x = L.conv_bn(project, project_bn, x, train, residual=inputs)
                else:
                    x = L.conv_bn(project, project_bn, x, train)
                b += 1

        return L.conv_bn(layer(L.Conv2D, "top_conv", features=round_filters(1280, width),
                               kernel_size=1, padding="SAME", use_bias=False),
                         bn("top_bn"), x, train, activation="swish")
