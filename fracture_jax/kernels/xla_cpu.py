"""XLA-CPU workarounds: the same operations in XLA's own primitives, arranged so that XLA's
CPU backend runs them fast, with hand-written gradients. Used on CPU where oneDNN's library is
missing (and for pooling always). Why each exists, and what it gained: ``benchmarks/README.md``.

- ``cpu_conv``: XLA's convolution, its kernel gradient as one matmul per kernel row;
- ``shifted_depthwise``: a depthwise convolution as a sum of shifted, scaled windows, both
  gradients as shifted sums too (XLA's CPU depthwise kernel and its gradient are 10-50x slower);
- ``tiled_max_pool``: max pooling over non-overlapping tiles, its gradient in one pass.
"""

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

DIMS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, kernel, strides: int, padding):
    return lax.conv_general_dilated(x, kernel, (strides,) * 2, padding, dimension_numbers=DIMS)


def taps(x, kh: int, kw: int, strides: int, oh: int, ow: int):
    """The k*k strided windows of ``x`` that a (kh, kw) kernel's taps read, as ((i, j), slice)."""
    n, _, _, c = x.shape
    for i in range(kh):
        for j in range(kw):
            yield (i, j), lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * strides + 1,
                                                      j + (ow - 1) * strides + 1, c),
                                    (1, strides, strides, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def cpu_conv(x, kernel, strides: int, padding: tuple):
    """XLA's convolution (explicit ``padding``), with the kernel's gradient as one matmul per
    kernel row over the row's concatenated input windows (the input's gradient stays XLA's)."""
    return xla_conv(x, kernel, strides, padding)


def _cpu_conv_fwd(x, kernel, strides, padding):
    return cpu_conv(x, kernel, strides, padding), (x, kernel)


def _cpu_conv_bwd(strides, padding, saved, dy):
    x, kernel = saved
    kh, kw = kernel.shape[:2]
    _, input_vjp = jax.vjp(lambda x: xla_conv(x, kernel, strides, padding), x)
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    windows = dict(taps(padded, kh, kw, strides, dy.shape[1], dy.shape[2]))
    pixels = dy.reshape(-1, dy.shape[-1])
    rows = [lax.dot_general(jnp.concatenate([windows[i, j] for j in range(kw)], axis=-1)
                            .reshape(pixels.shape[0], -1), pixels, (((0,), (0,)), ((), ())))
            for i in range(kh)]
    return input_vjp(dy)[0], jnp.stack(rows).reshape(kernel.shape).astype(kernel.dtype)


cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _out_size(x, kernel, strides: int) -> tuple[int, int]:
    return ((x.shape[1] - kernel.shape[0]) // strides + 1,
            (x.shape[2] - kernel.shape[1]) // strides + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shifted_depthwise(x, kernel, strides: int):
    """VALID depthwise convolution of the padded ``x`` by a (kh, kw, C, 1) kernel, as a sum
    of shifted, scaled windows."""
    kh, kw = kernel.shape[:2]
    terms = (patch * kernel[i, j, :, 0]
             for (i, j), patch in taps(x, kh, kw, strides, *_out_size(x, kernel, strides)))
    return functools.reduce(operator.add, terms)


def _shifted_depthwise_fwd(x, kernel, strides):
    return shifted_depthwise(x, kernel, strides), (x, kernel)


def _batch_folded(products, groups: int = 8):
    """``products`` (N, H, W, C) summed down to N/g images by adding its g interleaved batch
    slices, g the largest divisor of N up to ``groups``. The additions fuse with the window
    slice that feeds them; a reduction straight over the slice first copies it whole."""
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
                                 for _, patch in taps(x, kh, kw, strides, oh, ow)]),
                      axis=(1, 2, 3))
    rows = (kh - 1, kh - 1 + x.shape[1] - (oh - 1) * strides - kh, strides - 1)
    cols = (kw - 1, kw - 1 + x.shape[2] - (ow - 1) * strides - kw, strides - 1)
    dy_wide = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), rows, cols, (0, 0, 0)))
    flipped = kernel[::-1, ::-1]
    dx = functools.reduce(operator.add, (
        patch * flipped[i, j, :, 0]
        for (i, j), patch in taps(dy_wide, kh, kw, 1, x.shape[1], x.shape[2])))
    return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def _tiles(x, k: int):
    """``x`` (N, H, W, C) as (N, H/k, k, W/k, k, C) tiles (rows and columns past the last
    whole tile dropped)."""
    n, h, w, c = x.shape
    return x[:, :h // k * k, :w // k * k].reshape(n, h // k, k, w // k, k, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tiled_max_pool(x, k: int):
    """Max pooling over non-overlapping k x k tiles. Its gradient goes to each tile's first
    maximum in row-major order, as XLA's ``select_and_scatter`` does, in one elementwise pass
    (XLA's own takes an iota and a scatter per pool)."""
    return _tiles(x, k).max(axis=(2, 4))


def _tiled_max_pool_fwd(x, k):
    y = tiled_max_pool(x, k)
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


tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)
