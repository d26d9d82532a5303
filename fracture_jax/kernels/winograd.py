"""Winograd's F(2x2, 3x3) convolution (Lavin and Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016) for 3x3, stride-1, one-pixel-padded layers with many channels on CPU.

Each 2x2 output tile comes from a 4x4 input tile: the tiles are transformed by additions
(``_BT``), multiplied with the transformed kernel (``_G``) as 16 matmuls over the channels, and
transformed back (``_AT``): 2.25x fewer multiply-adds than the direct convolution. oneDNN 3.2
offers no float32 Winograd on this CPU class. The input transform is C (``winograd.c``, built by
``native``), the rest XLA's operations. What it gains over oneDNN's direct convolution per
layer, and its error against XLA's convolution: ``benchmarks/README.md``.
"""

import functools

import jax.numpy as jnp
import numpy as np

from fracture_jax.kernels import ffi, native

_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))

# Where it measured faster than oneDNN's direct convolution (CPU time, bias and ReLU included):
# 128 channels or more on both sides (VGG16's blocks 2-5, ResNet50's 33x33 and 17x17 layers:
# 1.07-1.70x) and 2,048 tiles or more, so that the 16 matmuls have rows enough (at 512-800
# tiles: 0.86-0.92x). With 64 channels the transforms' memory traffic, which grows with the
# pixels and not with the channels, eats the saved multiplies (0.98-1.04x).
_MIN_CHANNELS, _MIN_TILES = 128, 2048


def _grid(x_shape) -> tuple:
    """The 2x2 output tiles of ``x_shape`` down and across: the last ones cut off if odd."""
    return -(-x_shape[1] // 2), -(-x_shape[2] // 2)


def _tiles(x_shape) -> int:
    th, tw = _grid(x_shape)
    return x_shape[0] * th * tw


def pays(x_shape, kernel_shape, strides: int, padding: tuple) -> bool:
    """Whether a convolution of ``x_shape`` by HWIO ``kernel_shape`` takes this path (never a
    depthwise one: its (kh, kw, C, 1) kernel has one output channel)."""
    kh, kw, cin, cout = kernel_shape
    return ((kh, kw, strides) == (3, 3, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
            and min(cin, cout) >= _MIN_CHANNELS and _tiles(x_shape) >= _MIN_TILES)


def _combine(coefficients, terms):
    """The sum of ``terms`` weighted by ``coefficients``, each 0, 1 or -1."""
    return sum(t if c > 0 else -t for c, t in zip(coefficients, terms) if c)


def _xla_input_transform(x):
    """(16, tiles, C): each 4x4 tile of the padded ``x``, transformed by ``_BT`` both ways."""
    n, h, w, cin = x.shape
    th, tw = _grid(x.shape)
    x = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    tile = [[x[:, i:i + 2 * th:2, j:j + 2 * tw:2] for j in range(4)] for i in range(4)]
    rows = [[_combine(_BT[a], [tile[i][j] for i in range(4)]) for j in range(4)]
            for a in range(4)]
    return jnp.stack([_combine(_BT[b], rows[a]) for a in range(4) for b in range(4)]).reshape(
        16, -1, cin)


@functools.cache
def native_transform():
    """``winograd.c``'s input transform function, or None where it cannot run."""
    library = native.library("winograd")
    if library is None or not ffi.available():
        return None
    return library.winograd_input_transform


@functools.cache
def _native_transform_plan(x_shape) -> int | None:
    """The ``ffi`` plan of ``winograd.c``'s input transform for ``x_shape``, or None."""
    transform = native_transform()
    if transform is None:
        return None
    plan = ffi.Plan()
    plan.function(transform, (ffi.ARGUMENT, 0), (ffi.RESULT, 0), x_shape)
    return plan.number


def input_transform(x):
    """``_xla_input_transform``'s values, from ``winograd.c`` where it compiled."""
    plan = _native_transform_plan(x.shape)
    if plan is None:
        return _xla_input_transform(x)
    return ffi.call(plan, (16, _tiles(x.shape), x.shape[3]), x)


def conv3x3(x, kernel):
    """NHWC ``x`` convolved with HWIO 3x3 ``kernel``, stride 1, one pixel of zero padding."""
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    th, tw = _grid(x.shape)
    u = jnp.einsum("ai,bj,ijco->abco", _G, _G, kernel).reshape(16, cin, cout)
    m = jnp.einsum("ptc,pco->pto", input_transform(x), u).reshape(4, 4, n, th, tw, cout)
    rows = [[_combine(_AT[a], [m[i, j] for i in range(4)]) for j in range(4)] for a in range(2)]
    y = jnp.stack([jnp.stack([_combine(_AT[b], rows[a]) for b in range(2)], axis=3)
                   for a in range(2)], axis=2)  # (n, th, 2, tw, 2, cout)
    return y.reshape(n, 2 * th, 2 * tw, cout)[:, :h, :w]


def input_gradient(dy, kernel):
    """The gradient of ``conv3x3`` with respect to its input: the output's gradient convolved
    with the kernel turned by 180 degrees, its input and output channels swapped."""
    return conv3x3(dy, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
