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

from fracture_jax.models import onednn, winograd

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


_BUILT = contextvars.ContextVar("built", default=None)


@contextlib.contextmanager
def layers_built():
    """The names of the layers with weights built meanwhile, in the order they were built.

    Models build their layers in Keras' order (the order ``frozen`` counts in); they may call
    them in another: a convolution with a BatchNorm in its epilogue calls the BatchNorm first.
    """
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


Epilogue = Sequence[tuple[str, jax.Array | None]]


@jax.custom_vjp
def _relu(x):
    """ReLU with the gradient masked by its output (``y > 0``, the same mask as ``x > 0``): the
    backward pass reads the stored output, where XLA re-derived the input of every ReLU on
    ResNet50's residual stream from the block convolutions before it (train step 1.03-1.04x)."""
    return jnp.maximum(x, jnp.zeros((), x.dtype))


def _relu_fwd(x):
    y = _relu(x)
    return y, y


def _relu_bwd(y, dy):
    return (jnp.where(y > 0, dy, jnp.zeros((), dy.dtype)),)


_relu.defvjp(_relu_fwd, _relu_bwd)
_ACTIVATIONS = {"relu": _relu, "swish": jax.nn.silu}


def apply_epilogue(y, epilogue: Epilogue):
    """``epilogue``'s steps on ``y`` in order: ("add", v), ("mul", v), ("relu" or "swish",
    None)."""
    for op, v in epilogue:
        y = _ACTIVATIONS[op](y) if op in _ACTIVATIONS else y + v if op == "add" else y * v
    return y


def _checked_ops(epilogue: Epilogue, where: str) -> tuple:
    ops = tuple(op for op, _ in epilogue)
    if not set(ops) <= {"add", "mul", *_ACTIVATIONS} or set(ops[:-1]) & set(_ACTIVATIONS):
        raise ValueError(f"{where}: an epilogue adds, multiplies, and can end in a ReLU or a "
                         f"swish; not {ops}")
    return ops


def conv2d(x, kernel, strides: int, padding: Pad, epilogue: Epilogue = ()):
    """A dense convolution, then ``apply_epilogue`` (its operands of shape (C,) or the
    output's; an activation only last). On CPU in float32 with oneDNN's library: oneDNN's, the
    epilogue inside the same call (``_onednn_conv``). Otherwise 1x1 kernels run as a 2-D matmul
    over the pixels (its gradients are matmuls too), and on CPU a larger kernel's gradient is
    computed as matmuls (``_cpu_conv``) when it has many input channels or a stride."""
    kh, kw, cin, cout = kernel.shape
    ops = _checked_ops(epilogue, "conv2d")
    if _onednn_runs(x, kernel):
        return _onednn_call(x, kernel, strides, padding, epilogue, ops, depthwise=False)
    if kh == kw == 1:
        y = _pointwise(x, kernel, strides)
    elif (jax.default_backend() != "cpu" or _PORTABLE.get()
          or cin < _MATMUL_GRADIENT_MIN_CHANNELS and strides == 1):
        y = _xla_conv(x, kernel, strides, padding)
    else:
        y = _cpu_conv(x, _varying_like(kernel, x), strides,
                      _explicit(padding, x.shape, kh, kw, strides))
    return apply_epilogue(y, epilogue)


def _onednn_runs(x, kernel) -> bool:
    return (jax.default_backend() == "cpu" and not _PORTABLE.get() and x.dtype == jnp.float32
            and kernel.dtype == jnp.float32 and onednn.available())


def _onednn_call(x, kernel, strides: int, padding: Pad, epilogue: Epilogue, ops: tuple,
                 depthwise: bool):
    """``_onednn_conv`` with explicit padding, operands and kernel varying as ``x`` does."""
    kh, kw = kernel.shape[:2]
    operands = tuple(_varying_like(v, x) for _, v in epilogue if v is not None)
    return _onednn_conv(x, _varying_like(kernel, x), operands, strides,
                        _explicit(padding, x.shape, kh, kw, strides), ops, depthwise)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _onednn_conv(x, kernel, operands: tuple, strides: int, padding: tuple, ops: tuple,
                 depthwise: bool):
    """oneDNN's convolution (``models/onednn.py``), dense or depthwise, and epilogue ``ops`` on
    ``operands``; Winograd's for the wide 3x3 layers where it is faster (``_forward``). The
    gradients are oneDNN's too, but for a dense 1x1 kernel's: the 2-D matmuls of
    ``_pointwise`` (with oneDNN's 1x1 input gradient EfficientNetB2's full step ran at 4.95
    images/s, with the matmuls at 7.95), and Winograd's input gradient where it pays."""
    steps = iter(operands)
    epilogue = tuple((op, None if op in _ACTIVATIONS else next(steps)) for op in ops)
    return _varying_like(_forward(x, kernel, strides, padding, epilogue, depthwise), x)


def _forward(x, kernel, strides: int, padding: tuple, epilogue: Epilogue, depthwise: bool):
    """Winograd's convolution and the epilogue where ``winograd.pays``, else oneDNN's."""
    if winograd.pays(x.shape, kernel.shape, strides, padding):
        return apply_epilogue(winograd.conv3x3(x, kernel), epilogue)
    return onednn.forward(x, kernel, strides, padding, epilogue, depthwise)


def _onednn_conv_fwd(x, kernel, operands, strides, padding, ops, depthwise):
    y = _onednn_conv(x, kernel, operands, strides, padding, ops, depthwise)
    return y, (x, kernel, operands, y if ops[-1:] == ("relu",) else None)


def _onednn_conv_bwd(strides, padding, ops, depthwise, saved, dy):
    x, kernel, operands, y = saved
    dz, doperands = _epilogue_gradients(
        ops, operands, y, dy, lambda: _forward(x, kernel, strides, padding, (), depthwise))
    if kernel.shape[:2] == (1, 1) and not depthwise:
        dx, dkernel = jax.vjp(lambda x, kernel: _pointwise(x, kernel, strides), x, kernel)[1](dz)
    else:  # (winograd.pays is symmetric in the channels: it holds for the transposed kernel)
        dx = (winograd.input_gradient(dz, kernel)
              if winograd.pays(dz.shape, kernel.shape, strides, padding)
              else onednn.input_gradient(dz, kernel, x.shape, strides, padding, depthwise))
        dkernel = onednn.kernel_gradient(x, dz, kernel.shape, strides, padding, depthwise)
        dx, dkernel = _varying_like(dx, x), _varying_like(dkernel, kernel)
    return dx, dkernel, doperands


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def _epilogue_gradients(ops: tuple, operands: tuple, y, dy, convolution):
    """The gradients of ``apply_epilogue`` with respect to its input and its operands, from
    its output ``y``: a final ReLU's mask is ``y > 0``; a swish's gradient, and a product's
    operand's, need the values before them, recomputed from ``convolution()`` (XLA drops that
    where unused)."""
    arithmetic = [op for op in ops if op not in _ACTIVATIONS]
    g = dy
    if ops[-1:] == ("relu",):
        (g,) = _relu_bwd(y, dy)
    elif ops[-1:] == ("swish",):
        before = apply_epilogue(convolution(), tuple(zip(arithmetic, operands)))
        g = jax.vjp(_ACTIVATIONS["swish"], before)[1](dy)[0]
    grads = list(operands)
    for i in reversed(range(len(arithmetic))):
        v = operands[i]
        if arithmetic[i] == "add":
            grads[i] = _sum_to(g, v.shape)
        else:
            before = apply_epilogue(convolution(), tuple(zip(arithmetic[:i], operands[:i])))
            grads[i], g = _sum_to(g * before, v.shape), g * v
    return g, tuple(_varying_like(d, v) for d, v in zip(grads, operands))


def _sum_to(g, shape):
    """``g`` summed down to a per-channel ``shape`` (C,), or ``g`` itself."""
    return g if g.shape == tuple(shape) else jnp.sum(g, axis=(0, 1, 2))


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


def depthwise_conv2d(x, kernel, strides: int, padding: Pad, epilogue: Epilogue = ()):
    """A depthwise convolution with kernel (kh, kw, C, 1), then ``apply_epilogue``. On CPU in
    float32 with oneDNN's library: oneDNN's, the epilogue in the same call; without it, a sum
    of k*k shifted, scaled copies of the input (XLA's CPU depthwise kernel and its gradient are
    10-50x slower). Elsewhere: XLA's own."""
    kh, kw, c, _ = kernel.shape
    ops = _checked_ops(epilogue, "depthwise_conv2d")
    if _onednn_runs(x, kernel):
        return _onednn_call(x, kernel, strides, padding, epilogue, ops, depthwise=True)
    if jax.default_backend() != "cpu" or _PORTABLE.get():
        y = lax.conv_general_dilated(x, kernel.reshape(kh, kw, 1, c), (strides,) * 2, padding,
                                     dimension_numbers=_DIMS, feature_group_count=c)
    else:
        x = jnp.pad(x, ((0, 0), *_explicit(padding, x.shape, kh, kw, strides), (0, 0)))
        y = _shifted_depthwise(x, _varying_like(kernel, x), strides)
    return apply_epilogue(y, epilogue)


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


class Conv2D(_KerasLayer):
    """``keras.layers.Conv2D``: kernel (kh, kw, in, out), optional bias, and activation None,
    "relu" or "swish". Called with an ``epilogue``, the convolution applies it after those
    (``conv2d``)."""

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
        return conv2d(_freeze(x.astype(self.dtype), self.frozen),
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
        return depthwise_conv2d(_freeze(x.astype(self.dtype), self.frozen),
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
    are the convolution's epilogue: one oneDNN call on CPU, no pass over memory each."""
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
    """``keras.layers.MaxPooling2D`` on NHWC. On CPU, windows that tile the image (VGG16's)
    take ``_tiled_max_pool``."""
    if (window == strides and padding == "VALID" and jax.default_backend() == "cpu"
            and not _PORTABLE.get()):
        return _tiled_max_pool(x, window)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                             (1, strides, strides, 1), padding)


def _tiles(x, k: int):
    """``x`` (N, H, W, C) as (N, H/k, k, W/k, k, C) tiles (rows and columns past the last
    whole tile dropped)."""
    n, h, w, c = x.shape
    return x[:, :h // k * k, :w // k * k].reshape(n, h // k, k, w // k, k, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_pool(x, k: int):
    """Max pooling over non-overlapping k x k tiles. Its gradient goes to each tile's first
    maximum in row-major order, as XLA's ``select_and_scatter`` does, in one elementwise pass
    (with XLA's own, an iota and a scatter per pool, VGG16's CPU train step ran at 1.27
    images/s, with this at 1.61)."""
    return _tiles(x, k).max(axis=(2, 4))


def _tiled_max_pool_fwd(x, k):
    y = _tiled_max_pool(x, k)
    return y, (x, y)


def _tiled_max_pool_bwd(k, saved, dy):
    x, y = saved
    tiles, taken, rows = _tiles(x, k), jnp.zeros(y.shape, bool), []
    for i in range(k):
        row = []
        for j in range(k):
            first = (tiles[:, :, i, :, j] == y) & ~taken
            taken = taken | first
            row.append(jnp.where(first, dy, 0.0))
        rows.append(jnp.stack(row, axis=3))
    dx = jnp.stack(rows, axis=2).reshape(tiles.shape[0], -1, tiles.shape[3] * k, x.shape[-1])
    pads = ((0, 0), (0, x.shape[1] - dx.shape[1]), (0, x.shape[2] - dx.shape[2]), (0, 0))
    return (jnp.pad(dx, pads),)


_tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


def global_avg_pool(x):
    """``keras.layers.GlobalAveragePooling2D`` on NHWC, in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


swish = _ACTIVATIONS["swish"]
relu = _ACTIVATIONS["relu"]


