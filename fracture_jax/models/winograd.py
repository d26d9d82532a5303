"""Winograd's F(2x2, 3x3) convolution (Lavin and Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016) for 3x3, stride-1, one-pixel-padded layers with many channels on CPU.

Each 2x2 output tile comes from a 4x4 input tile: the tiles are transformed by additions
(``_BT``), multiplied with the transformed kernel (``_G``) as 16 matmuls over the channels, and
transformed back (``_AT``): 2.25x fewer multiply-adds than the direct convolution. oneDNN 3.2
offers no float32 Winograd on this CPU class, so this is written in XLA's operations. On a
2-core AVX-512 CPU it ran VGG16's 512-channel layers 1.15-1.35x faster than oneDNN's direct
convolution (``pays`` says where), with a smaller error against XLA's convolution (6-7e-7
relative, oneDNN's 1.1-1.3e-6).
"""

import jax.numpy as jnp
import numpy as np

_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))

# Where it measured faster than oneDNN's direct convolution (batch 8 and 32): 512 channels on
# one side and 256 or more on the other (VGG16's block 4: 1.15-1.35x), from 24 pixels a side.
# With fewer channels (VGG16's 65x65 layers, ResNet50's 17x17x256) the transforms' memory
# traffic, which grows with the pixels and not with the channels, ate the saved multiplies
# (0.74-1.02x); at 16 pixels a side or less the matmuls are too short (0.5-1.0x).
_MIN_CHANNELS, _WIDE_CHANNELS, _MIN_SIDE = 256, 512, 24


def pays(x_shape, kernel_shape, strides: int, padding: tuple) -> bool:
    """Whether a convolution of ``x_shape`` by HWIO ``kernel_shape`` takes this path (never a
    depthwise one: its (kh, kw, C, 1) kernel has one output channel)."""
    kh, kw, cin, cout = kernel_shape
    return ((kh, kw, strides) == (3, 3, 1) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
            and min(cin, cout) >= _MIN_CHANNELS and max(cin, cout) >= _WIDE_CHANNELS
            and min(x_shape[1:3]) >= _MIN_SIDE)


def _combine(coefficients, terms):
    """The sum of ``terms`` weighted by ``coefficients``, each 0, 1 or -1."""
    return sum(t if c > 0 else -t for c, t in zip(coefficients, terms) if c)


def conv3x3(x, kernel):
    """NHWC ``x`` convolved with HWIO 3x3 ``kernel``, stride 1, one pixel of zero padding."""
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    th, tw = -(-h // 2), -(-w // 2)
    x = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    tile = [[x[:, i:i + 2 * th:2, j:j + 2 * tw:2] for j in range(4)] for i in range(4)]
    rows = [[_combine(_BT[a], [tile[i][j] for i in range(4)]) for j in range(4)]
            for a in range(4)]
    v = jnp.stack([_combine(_BT[b], rows[a]) for a in range(4) for b in range(4)])
    u = jnp.einsum("ai,bj,ijco->abco", _G, _G, kernel).reshape(16, cin, cout)
    m = jnp.einsum("ptc,pco->pto", v.reshape(16, -1, cin), u).reshape(4, 4, n, th, tw, cout)
    rows = [[_combine(_AT[a], [m[i, j] for i in range(4)]) for j in range(4)] for a in range(2)]
    y = jnp.stack([jnp.stack([_combine(_AT[b], rows[a]) for b in range(2)], axis=3)
                   for a in range(2)], axis=2)  # (n, th, 2, tw, 2, cout)
    return y.reshape(n, 2 * th, 2 * tw, cout)[:, :h, :w]


def input_gradient(dy, kernel):
    """The gradient of ``conv3x3`` with respect to its input: the output's gradient convolved
    with the kernel turned by 180 degrees, its input and output channels swapped."""
    return conv3x3(dy, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
