"""Pooling: ``max_pool``, dispatched by ``policy`` (tiling windows on CPU take
``xla_cpu.tiled_max_pool``)."""

import jax.numpy as jnp
from jax import lax

from fracture_jax.kernels import policy
from fracture_jax.kernels.xla_cpu import tiled_max_pool


def max_pool(x, window: int, strides: int, padding: str = "VALID"):
    """``keras.layers.MaxPooling2D`` on NHWC."""
    if window == strides and padding == "VALID" and policy.fast_cpu():
        return tiled_max_pool(x, window)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                             (1, strides, strides, 1), padding)
