"""Backend-specific kernels: how the models' operations run fast on each platform.

The models call the entry points below and never meet a backend; on a GPU or TPU, and in
export, these are XLA's own operations. On CPU they take native paths.

Entry points (what ``models/layers.py`` calls):
    conv2d, depthwise_conv2d   a convolution followed by an epilogue (bias, inference
                               BatchNorm, residual, activation) in one call: ``conv``
    max_pool                   ``pool``
    relu, swish, apply_epilogue
    portable                   trace with plain XLA operations everywhere (export): ``policy``
    describe                   which kernels this process runs, for logs and records

The map:
    policy.py        every switch (environment, portable mode, platform), read once
    conv.py          the convolution entry points, their dispatch and oneDNN's custom VJP
    epilogue.py      the epilogue's steps and their gradients; a ReLU masked by its output
    pool.py          max pooling's dispatch
    xla_cpu.py       XLA-CPU workarounds with custom gradients (matmul kernel gradients,
                     shifted-sum depthwise convolutions, tiled max pooling)
    sharding.py      typing parameters and native results per device inside shard_map
    onednn.py        oneDNN's convolutions, built per shape as plans of ``ffi``
    winograd.py/.c   Winograd's F(2x2, 3x3) for wide 3x3 layers, its input transform in C
    ffi.py           plans of native steps (oneDNN primitives, C functions) and the one XLA
                     FFI custom call that runs them
    ffi_handler.cc   its handler, in C++ against the XLA FFI headers jaxlib ships: runs a
                     plan's steps itself, with no Python and no GIL
    native.py        compiles the C/C++ sources on first use, cached per source and CPU
    host_memory.py   glibc malloc tunables for XLA's CPU buffers (CPU hosts only)

Measurements behind each choice: ``benchmarks/README.md``.
"""

import importlib

_ENTRY_POINTS = {"Pad": "conv", "conv2d": "conv", "depthwise_conv2d": "conv",
                 "Epilogue": "epilogue", "apply_epilogue": "epilogue", "relu": "epilogue",
                 "swish": "epilogue", "describe": "policy", "portable": "policy",
                 "max_pool": "pool"}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str):
    """The entry points, imported on first use: ``host_memory`` runs before JAX is imported."""
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_ENTRY_POINTS[name]}"), name)
