"""Keras layers in Flax, with Keras' variable names, shapes and float32 arithmetic.

Every layer stores its variables under the names Keras gives them (``kernel``, ``gamma``,
``moving_mean``...) in the order Keras writes them, so a Keras weight file maps onto a layer
by position. A layer built with ``frozen=True`` runs in inference mode and passes no gradient.
"""

import contextlib
import contextvars
import functools
import operator
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fracture_jax.models import onednn

_DIMS = ("NHWC", "HWIO", "NHWC")
_PORTABLE = contextvars.ContextVar("portable", default=False)


@contextlib.contextmanager
def portable():
    """Trace with the plain XLA operations everywhere (for export), not the CPU fast paths."""
    token = _PORTABLE.set(True)
    try:
        yield
    finally:
        _PORTABLE.reset(token)

Pad = str | Sequence[tuple[int, int]]


def _freeze(x, frozen: bool):
    return lax.stop_gradient(x) if frozen else x


def conv2d(x, kernel, strides: int, padding: Pad):
    """A dense convolution. On CPU in float32 with oneDNN's library: oneDNN's (``_onednn_conv``).
    Otherwise 1x1 kernels run as a 2-D matmul over the pixels (its gradients are matmuls too),
    and on CPU a larger kernel's gradient is computed as matmuls (``_cpu_conv``) when it has
    many input channels or a stride."""
    kh, kw, cin, cout = kernel.shape
    if _onednn_runs(x, kernel):
        return _onednn_conv(x, _varying_like(kernel, x), strides,
                            _explicit(padding, x.shape, kh, kw, strides))
    if kh == kw == 1:
        return _pointwise(x, kernel, strides)
    few_channels = cin < _MATMUL_GRADIENT_MIN_CHANNELS and strides == 1
    if jax.default_backend() != "cpu" or _PORTABLE.get() or few_channels:
        return _xla_conv(x, kernel, strides, padding)
    return _cpu_conv(x, _varying_like(kernel, x), strides, _explicit(padding, x.shape, kh, kw,
                                                                     strides))


def _onednn_runs(x, kernel) -> bool:
    return (jax.default_backend() == "cpu" and not _PORTABLE.get() and x.dtype == jnp.float32
            and kernel.dtype == jnp.float32 and onednn.available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, kernel, strides: int, padding: tuple):
    """oneDNN's convolution (``models/onednn.py``). The gradients of a kernel larger than 1x1
    are oneDNN's too; a 1x1 kernel's are the 2-D matmuls of ``_pointwise`` (with oneDNN's 1x1
    input gradient EfficientNetB2's full step ran at 4.95 images/s, with the matmuls at 7.95)."""
    return _varying_like(onednn.forward(x, kernel, strides, padding), x)


def _onednn_conv_fwd(x, kernel, strides, padding):
    return _onednn_conv(x, kernel, strides, padding), (x, kernel)


def _onednn_conv_bwd(strides, padding, saved, dy):
    x, kernel = saved
    if kernel.shape[:2] == (1, 1):
        return jax.vjp(lambda x, kernel: _pointwise(x, kernel, strides), x, kernel)[1](dy)
    return (_varying_like(onednn.input_gradient(dy, kernel, x.shape, strides, padding), x),
            _varying_like(onednn.kernel_gradient(x, dy, kernel.shape, strides, padding), kernel))


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def _pointwise(x, kernel, strides: int):
    """A 1x1 convolution as ``_pixel_matmul``."""
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    return _pixel_matmul(x, kernel.reshape(kernel.shape[2:]))


def _pixel_matmul(x, matrix):
    """``x`` (N, H, W, C) times ``matrix`` (C, D) as one 2-D matmul over the N*H*W pixels: its
    kernel gradient is then a 2-D matmul too, which XLA's CPU runs without first transposing the
    output gradient (the 4-D contraction's transpose, fused with BatchNorm's backward, took a
    quarter of ResNet50's train step)."""
    return (x.reshape(-1, x.shape[-1]) @ matrix).reshape(*x.shape[:-1], matrix.shape[-1])


# From 64 input channels the matmuls beat XLA's CPU kernel gradient (VGG16's full step: 1.04
# against 0.83 images/s when only layers of 128 or more took them); below, with the image's 3
# channels or a small CNN's 16 and 32, XLA's own was as fast or faster, except for strided
# kernels (the 3-channel stems of EfficientNetB2 and ResNet50: their full steps ran at 7.42
# and 2.69 images/s with the matmuls, 6.52 and 2.64 with XLA's).
_MATMUL_GRADIENT_MIN_CHANNELS = 64


def _xla_conv(x, kernel, strides: int, padding: Pad):
    return lax.conv_general_dilated(x, kernel, (strides,) * 2, padding, dimension_numbers=_DIMS)


def _explicit(padding: Pad, shape, kh: int, kw: int, strides: int) -> tuple:
    """``padding`` as ((top, bottom), (left, right))."""
    if padding == "SAME":
        return _same_pads(shape[1], kh, strides), _same_pads(shape[2], kw, strides)
    if padding == "VALID":
        return (0, 0), (0, 0)
    return tuple(tuple(p) for p in padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_conv(x, kernel, strides: int, padding: tuple):
    """XLA's convolution, with the kernel's gradient as one matmul per kernel row over the
    row's concatenated input windows: XLA's CPU kernel gradient ran at 17-31 GFLOP/s on
    VGG16's layers, these matmuls at 60-115 (the input's gradient stays XLA's)."""
    return _xla_conv(x, kernel, strides, padding)


def _cpu_conv_fwd(x, kernel, strides, padding):
    return _cpu_conv(x, kernel, strides, padding), (x, kernel)


def _cpu_conv_bwd(strides, padding, saved, dy):
    x, kernel = saved
    kh, kw = kernel.shape[:2]
    _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding), x)
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    windows = dict(_taps(padded, kh, kw, strides, dy.shape[1], dy.shape[2]))
    pixels = dy.reshape(-1, dy.shape[-1])
    rows = [lax.dot_general(jnp.concatenate([windows[i, j] for j in range(kw)], axis=-1)
                            .reshape(pixels.shape[0], -1), pixels, (((0,), (0,)), ((), ())))
            for i in range(kh)]
    return input_vjp(dy)[0], jnp.stack(rows).reshape(kernel.shape).astype(kernel.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def depthwise_conv2d(x, kernel, strides: int, padding: Pad):
    """A depthwise convolution with kernel (kh, kw, C, 1). On CPU it runs as a sum of k*k
    shifted, scaled copies of the input: XLA's CPU depthwise kernel (and its gradient) is
    10-50x slower, and the sum gives the same float32 result. Elsewhere: XLA's own."""
    kh, kw, c, _ = kernel.shape
    if jax.default_backend() != "cpu" or _PORTABLE.get():
        return lax.conv_general_dilated(x, kernel.reshape(kh, kw, 1, c), (strides,) * 2, padding,
                                        dimension_numbers=_DIMS, feature_group_count=c)
    x = jnp.pad(x, ((0, 0), *_explicit(padding, x.shape, kh, kw, strides), (0, 0)))
    return _shifted_depthwise(x, _varying_like(kernel, x), strides)


def _varying_like(kernel, x):
    """``kernel`` marked as differing between devices where ``x`` does, inside shard_map: a
    custom gradient is per device, and JAX then sums the kernel's over the devices."""
    def varying(v) -> frozenset:
        aval = jax.typeof(v)
        manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; later versions: ``vma``
        return manual.varying if manual is not None else getattr(aval, "vma", frozenset())
    axes = tuple(varying(x) - varying(kernel))
    return lax.pcast(kernel, axes, to="varying") if axes else kernel


def _taps(x, kh: int, kw: int, strides: int, oh: int, ow: int):
    """The k*k strided windows of ``x`` that a (kh, kw) kernel's taps read, as ((i, j), slice)."""
    n, _, _, c = x.shape
    for i in range(kh):
        for j in range(kw):
            yield (i, j), lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * strides + 1,
                                                      j + (ow - 1) * strides + 1, c),
                                    (1, strides, strides, 1))


def _out_size(x, kernel, strides: int) -> tuple[int, int]:
    return ((x.shape[1] - kernel.shape[0]) // strides + 1,
            (x.shape[2] - kernel.shape[1]) // strides + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_depthwise(x, kernel, strides: int):
    """VALID depthwise convolution of the padded ``x`` as a sum of shifted, scaled windows."""
    kh, kw = kernel.shape[:2]
    terms = (patch * kernel[i, j, :, 0]
             for (i, j), patch in _taps(x, kh, kw, strides, *_out_size(x, kernel, strides)))
    return functools.reduce(operator.add, terms)


def _shifted_depthwise_fwd(x, kernel, strides):
    return _shifted_depthwise(x, kernel, strides), (x, kernel)


def _batch_folded(products, groups: int = 8):
    """``products`` (N, H, W, C) summed down to N/g images by adding its g interleaved batch
    slices, g the largest divisor of N up to ``groups``. The additions fuse with the window
    slice that feeds them; a reduction straight over the slice first copies it whole (the
    depthwise kernel gradient then ran 1.6-2.4x slower)."""
    n = products.shape[0]
    g = max(d for d in range(1, min(groups, n) + 1) if n % d == 0)
    return functools.reduce(operator.add, (products[i::g] for i in range(g)))


def _shifted_depthwise_bwd(strides, saved, dy):
    """Both gradients as shifted sums too: the input's is the flipped kernel run over the
    zero-dilated, padded output gradient (one fused pass, where autodiff of the slices gives
    one padded copy per tap), the kernel's one reduction per tap."""
    x, kernel = saved
    kh, kw = kernel.shape[:2]
    oh, ow = _out_size(x, kernel, strides)
    dkernel = jnp.sum(jnp.stack([_batch_folded(patch * dy)
                                 for _, patch in _taps(x, kh, kw, strides, oh, ow)]),
                      axis=(1, 2, 3))
    rows = (kh - 1, kh - 1 + x.shape[1] - (oh - 1) * strides - kh, strides - 1)
    cols = (kw - 1, kw - 1 + x.shape[2] - (ow - 1) * strides - kw, strides - 1)
    dy_wide = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), rows, cols, (0, 0, 0)))
    flipped = kernel[::-1, ::-1]
    dx = functools.reduce(operator.add, (
        patch * flipped[i, j, :, 0]
        for (i, j), patch in _taps(dy_wide, kh, kw, 1, x.shape[1], x.shape[2])))
    return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


class Conv2D(nn.Module):
    """``keras.layers.Conv2D``: kernel (kh, kw, in, out) and optional bias."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: Pad = "VALID"
    use_bias: bool = True
    frozen: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.he_normal(), (k, k, x.shape[-1], self.features))
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return _freeze(y, self.frozen)


class DepthwiseConv2D(nn.Module):
    """``keras.layers.DepthwiseConv2D`` (depth multiplier 1): kernel stored as (kh, kw, C, 1)."""

    kernel_size: int
    strides: int = 1
    padding: Pad = "VALID"
    frozen: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, c = self.kernel_size, x.shape[-1]
        kernel = self.param("depthwise_kernel", nn.initializers.he_normal(in_axis=-2, out_axis=-1),
                            (k, k, c, 1))
        y = depthwise_conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                             self.padding)
        return _freeze(y, self.frozen)


class Dense(nn.Module):
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


class BatchNormalization(nn.Module):
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
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (c,))
        beta = self.param("beta", nn.initializers.zeros, (c,))
        moving_mean = self.variable("batch_stats", "moving_mean", jnp.zeros, (c,), jnp.float32)
        moving_var = self.variable("batch_stats", "moving_variance", jnp.ones, (c,), jnp.float32)
        if train and not self.frozen:
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
        y = x * inv.astype(self.dtype) + res.astype(self.dtype)
        return _freeze(y, self.frozen)


class Normalization(nn.Module):
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
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                             (1, strides, strides, 1), padding)


def global_avg_pool(x):
    """``keras.layers.GlobalAveragePooling2D`` on NHWC, in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


swish = jax.nn.silu
relu = jax.nn.relu


KERAS_LAYERS = (Conv2D, DepthwiseConv2D, Dense, BatchNormalization, Normalization)
