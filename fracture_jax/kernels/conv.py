"""The convolution entry points: ``conv2d`` and ``depthwise_conv2d``, each followed by an
epilogue, dispatched by ``policy`` to the fastest path for the platform:

- CPU, float32, oneDNN's library loaded: one oneDNN call with the epilogue as its post-ops
  (Winograd's F(2x2, 3x3) for the wide 3x3 layers where ``winograd.pays``), custom gradients
  from oneDNN, Winograd and matmuls;
- CPU without it: ``xla_cpu``'s workarounds (matmul kernel gradients, shifted-sum depthwise);
- GPU, TPU and export (``policy.portable``): XLA's own convolution, 1x1 kernels as matmuls.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fracture_jax.kernels import onednn, policy, winograd
from fracture_jax.kernels.epilogue import (ACTIVATIONS, Epilogue, apply_epilogue, checked_ops,
                                           epilogue_gradients)
from fracture_jax.kernels.sharding import per_device
from fracture_jax.kernels.xla_cpu import DIMS, cpu_conv, shifted_depthwise, xla_conv

Pad = str | Sequence[tuple[int, int]]

# From 64 input channels the matmuls beat XLA's CPU kernel gradient; below, XLA's own was as
# fast or faster, except for strided kernels (benchmarks/README.md).
MATMUL_GRADIENT_MIN_CHANNELS = 64


def conv2d(x, kernel, strides: int, padding: Pad, epilogue: Epilogue = ()):
    """A dense convolution of NHWC ``x`` by HWIO ``kernel``, then ``apply_epilogue`` (its
    operands of shape (C,) or the output's; an activation only last)."""
    kh, kw, cin, _ = kernel.shape
    ops = checked_ops(epilogue, "conv2d")
    if policy.onednn_runs(x, kernel):
        return _onednn_call(x, kernel, strides, padding, epilogue, ops, depthwise=False)
    if kh == kw == 1:
        y = _pointwise(x, kernel, strides)
    elif not policy.fast_cpu() or cin < MATMUL_GRADIENT_MIN_CHANNELS and strides == 1:
        y = xla_conv(x, kernel, strides, padding)
    else:
        y = cpu_conv(x, per_device(kernel), strides,
                     _explicit(padding, x.shape, kh, kw, strides))
    return apply_epilogue(y, epilogue)


def depthwise_conv2d(x, kernel, strides: int, padding: Pad, epilogue: Epilogue = ()):
    """A depthwise convolution with kernel (kh, kw, C, 1), then ``apply_epilogue``."""
    kh, kw, c, _ = kernel.shape
    ops = checked_ops(epilogue, "depthwise_conv2d")
    if policy.onednn_runs(x, kernel):
        return _onednn_call(x, kernel, strides, padding, epilogue, ops, depthwise=True)
    if not policy.fast_cpu():
        y = lax.conv_general_dilated(x, kernel.reshape(kh, kw, 1, c), (strides,) * 2, padding,
                                     dimension_numbers=DIMS, feature_group_count=c)
    else:
        x = jnp.pad(x, ((0, 0), *_explicit(padding, x.shape, kh, kw, strides), (0, 0)))
        y = shifted_depthwise(x, per_device(kernel), strides)
    return apply_epilogue(y, epilogue)


def _onednn_call(x, kernel, strides: int, padding: Pad, epilogue: Epilogue, ops: tuple,
                 depthwise: bool):
    """``_onednn_conv`` with explicit padding; the kernel and the per-channel operands (the
    parameters) typed per device as the activations are (``sharding``)."""
    kh, kw = kernel.shape[:2]
    operands = tuple(v if v.ndim == x.ndim else per_device(v) for _, v in epilogue
                     if v is not None)
    return _onednn_conv(x, per_device(kernel), operands, strides,
                        _explicit(padding, x.shape, kh, kw, strides), ops, depthwise)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _onednn_conv(x, kernel, operands: tuple, strides: int, padding: tuple, ops: tuple,
                 depthwise: bool):
    """oneDNN's convolution, dense or depthwise, and epilogue ``ops`` on ``operands``;
    Winograd's for the wide 3x3 layers where it is faster (``_forward``). The gradients are
    oneDNN's too, but for a dense 1x1 kernel's (the 2-D matmuls of ``_pointwise``, faster than
    oneDNN's 1x1 input gradient), and Winograd's input gradient where it pays."""
    steps = iter(operands)
    epilogue = tuple((op, None if op in ACTIVATIONS else next(steps)) for op in ops)
    return _forward(x, kernel, strides, padding, epilogue, depthwise)


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
    dz, doperands = epilogue_gradients(
        ops, operands, y, dy, lambda: _forward(x, kernel, strides, padding, (), depthwise))
    if kernel.shape[:2] == (1, 1) and not depthwise:
        dx, dkernel = jax.vjp(lambda x, kernel: _pointwise(x, kernel, strides), x, kernel)[1](dz)
    else:  # (winograd.pays is symmetric in the channels: it holds for the transposed kernel)
        dx = (winograd.input_gradient(dz, kernel)
              if winograd.pays(dz.shape, kernel.shape, strides, padding)
              else onednn.input_gradient(dz, kernel, x.shape, strides, padding, depthwise))
        dkernel = onednn.kernel_gradient(x, dz, kernel.shape, strides, padding, depthwise)
    return dx, dkernel, doperands


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def _pointwise(x, kernel, strides: int):
    """A 1x1 convolution as one 2-D matmul over the N*H*W pixels: its kernel gradient is then a
    2-D matmul too, which XLA's CPU runs without first transposing the output gradient."""
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    matrix = kernel.reshape(kernel.shape[2:])
    return (x.reshape(-1, x.shape[-1]) @ matrix).reshape(*x.shape[:-1], matrix.shape[-1])


def _explicit(padding: Pad, shape, kh: int, kw: int, strides: int) -> tuple:
    """``padding`` as ((top, bottom), (left, right))."""
    if padding == "SAME":
        return _same_pads(shape[1], kh, strides), _same_pads(shape[2], kw, strides)
    if padding == "VALID":
        return (0, 0), (0, 0)
    return tuple(tuple(p) for p in padding)


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2
