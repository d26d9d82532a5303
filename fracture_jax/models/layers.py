"""Keras layers in Flax, with Keras' variable names, shapes and float32 arithmetic.

Every layer stores its variables under the names Keras gives them (``kernel``, ``gamma``,
``moving_mean``...) in the order Keras writes them, so a Keras weight file maps onto a layer
by position. A layer built with ``frozen=True`` runs in inference mode and passes no gradient.
The arithmetic runs through ``fracture_jax.kernels``, which picks the platform's fastest path.
"""

import contextlib
import contextvars
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fracture_jax import kernels
from fracture_jax.kernels import Epilogue, Pad, apply_epilogue

_BUILT = contextvars.ContextVar("built", default=None)


@contextlib.contextmanager
def layers_built():
    """The names of the layers with weights built meanwhile, in the order they were built:
    Keras' order, since the backbones build their layers as Keras does (they may call them in
    another: a convolution with a BatchNorm in its epilogue calls the BatchNorm first)."""
    token = _BUILT.set(names := [])
    try:
        yield names
    finally:
        _BUILT.reset(token)


class _KerasLayer(nn.Module):
    """A layer with Keras' variables: it records its name in ``layers_built``."""

    def __post_init__(self):
        super().__post_init__()
        names = _BUILT.get()
        if names is not None and self.name not in names:
            names.append(self.name)


def _freeze(x, frozen: bool):
    return lax.stop_gradient(x) if frozen else x


class Conv2D(_KerasLayer):
    """``keras.layers.Conv2D``: kernel (kh, kw, in, out), optional bias, and activation None,
    "relu" or "swish". Called with an ``epilogue``, the convolution applies it after those
    (``kernels.conv2d``)."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: Pad = "VALID"
    use_bias: bool = True
    activation: str | None = None
    frozen: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, epilogue: Epilogue = ()):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.he_normal(), (k, k, x.shape[-1], self.features))
        own = []
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            own.append(("add", _freeze(bias.astype(self.dtype), self.frozen)))
        if self.activation is not None:
            own.append((self.activation, None))
        # Frozen: no gradient reaches the input or the weights; an epilogue's operands (a
        # residual, a trainable BatchNorm's affine) keep theirs.
        return kernels.conv2d(_freeze(x.astype(self.dtype), self.frozen),
                      _freeze(kernel.astype(self.dtype), self.frozen), self.strides,
                      self.padding, (*own, *epilogue))

    def out_channels(self, x) -> int:
        return self.features


class DepthwiseConv2D(_KerasLayer):
    """``keras.layers.DepthwiseConv2D`` (depth multiplier 1, no bias): kernel stored as
    (kh, kw, C, 1). Called with an ``epilogue``, as ``Conv2D``."""

    kernel_size: int
    strides: int = 1
    padding: Pad = "VALID"
    frozen: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, epilogue: Epilogue = ()):
        k, c = self.kernel_size, x.shape[-1]
        kernel = self.param("depthwise_kernel", nn.initializers.he_normal(in_axis=-2, out_axis=-1),
                            (k, k, c, 1))
        return kernels.depthwise_conv2d(_freeze(x.astype(self.dtype), self.frozen),
                                _freeze(kernel.astype(self.dtype), self.frozen), self.strides,
                                self.padding, epilogue)

    def out_channels(self, x) -> int:
        return x.shape[-1]


class Dense(_KerasLayer):
    """``keras.layers.Dense``: kernel (in, out) and bias."""

    features: int
    frozen: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.glorot_uniform(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
        return _freeze(y, self.frozen)


class BatchNormalization(_KerasLayer):
    """``keras.layers.BatchNormalization`` over the last axis, Keras' formula and update rule.

    Inference computes ``x * inv + (beta - mean * inv)`` with ``inv = rsqrt(var + eps) * gamma``
    exactly as Keras' JAX backend does. Training normalises with the batch moments, synced
    across devices through ``axis_name``, and updates the moving averages with ``momentum``.
    """

    epsilon: float = 1e-3
    momentum: float = 0.99
    axis_name: str | None = None
    frozen: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, fold: bool = False):
        """Normalise ``x``. With ``fold=True`` (and ``train`` False) return the inference affine
        (scale, shift) for ``x``'s channels instead, for a convolution's epilogue (``conv_bn``):
        ``x`` may then be a ``jax.ShapeDtypeStruct``."""
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (c,))
        beta = self.param("beta", nn.initializers.zeros, (c,))
        moving_mean = self.variable("batch_stats", "moving_mean", jnp.zeros, (c,), jnp.float32)
        moving_var = self.variable("batch_stats", "moving_variance", jnp.ones, (c,), jnp.float32)
        if self.uses_batch_moments(train):
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            mean_sq = jnp.mean(jnp.square(xf), axes)
            if self.axis_name is not None:
                mean, mean_sq = lax.pmean((mean, mean_sq), self.axis_name)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
            if not self.is_initializing():
                m = self.momentum
                moving_mean.value = moving_mean.value * m + mean * (1.0 - m)
                moving_var.value = moving_var.value * m + var * (1.0 - m)
        else:
            mean, var = moving_mean.value, moving_var.value
        inv = lax.rsqrt(var + self.epsilon) * gamma
        res = -mean * inv + beta
        if fold:
            return _freeze(inv.astype(self.dtype), self.frozen), _freeze(res.astype(self.dtype),
                                                                         self.frozen)
        y = x * inv.astype(self.dtype) + res.astype(self.dtype)
        return _freeze(y, self.frozen)

    def uses_batch_moments(self, train: bool) -> bool:
        return train and not self.frozen


class Normalization(_KerasLayer):
    """``keras.layers.Normalization`` on the channel axis: ``(x - mean) / max(sqrt(var), 1e-7)``.

    Its statistics are constants of the data, not trained: they live in ``batch_stats``
    (``mean``, ``variance``, ``count``, Keras' order) and are never updated here.
    """

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32).value
        var = self.variable("batch_stats", "variance", jnp.ones, (c,), jnp.float32).value
        self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
        return (x - mean) / jnp.maximum(jnp.sqrt(var), 1e-7)


def conv_bn(conv: Conv2D | DepthwiseConv2D, bn: BatchNormalization, x, train: bool,
            residual=None, activation: str | None = None):
    """``bn(conv(x))``, plus ``residual``, then ``activation`` ("relu" or "swish"; both
    optional). With the BatchNorm in inference mode its affine, the residual and the activation
    are the convolution's epilogue: one kernel call, no pass over memory each."""
    tail = (*([] if residual is None else [("add", residual)]),
            *([] if activation is None else [(activation, None)]))
    if bn.uses_batch_moments(train):
        return apply_epilogue(bn(conv(x), train), tail)
    scale, shift = bn(jax.ShapeDtypeStruct((conv.out_channels(x),), conv.dtype), fold=True)
    return conv(x, (("mul", scale), ("add", shift), *tail))


def zero_pad(x, pads: Sequence[tuple[int, int]]):
    """``keras.layers.ZeroPadding2D`` on NHWC."""
    return jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))


def correct_pad(x, kernel_size: int):
    """Keras' ``imagenet_utils.correct_pad``: the padding before a stride-2 'valid' conv."""
    h, w = x.shape[1:3]
    c = kernel_size // 2
    return ((c - (1 - h % 2), c), (c - (1 - w % 2), c))


def max_pool(x, window: int, strides: int, padding: str = "VALID"):
    """``keras.layers.MaxPooling2D`` on NHWC."""
    return kernels.max_pool(x, window, strides, padding)


def global_avg_pool(x):
    """``keras.layers.GlobalAveragePooling2D`` on NHWC, in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


swish = kernels.swish
relu = kernels.relu


