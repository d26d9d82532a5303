"""Native CPU kernels inside XLA's programs: one XLA FFI custom call.

A *plan* is a Python callable ``plan(argument addresses, result addresses)`` that runs native
code (oneDNN's primitives, this package's C kernels) on XLA's own buffers, with no copies.
``register`` files a plan when a program is traced and returns its number; ``call`` emits the
custom call that runs it. The FFI handler is C++ (``ffi_handler.cc``, compiled by ``native``
against the headers jaxlib ships and registered with ``jax.ffi.register_ffi_target``): it
reads the plan's number and the buffers, and calls ``_run`` with them; a plan's exception
comes back to XLA, which raises it with the message.
"""

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fracture_jax.kernels import native
from fracture_jax.kernels.sharding import per_device

TARGET = "fracture_jax_native"
_PLANS: list = []
_Addresses = ctypes.POINTER(ctypes.c_void_p)
_Runner = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, _Addresses, ctypes.c_int64,
                           _Addresses, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


@_Runner
def _run(plan, args, num_args, rets, num_rets, message, size):
    try:
        _PLANS[plan]([args[i] for i in range(num_args)], [rets[i] for i in range(num_rets)])
        return 0
    except Exception as error:  # noqa: BLE001 -- reported to XLA, which raises it
        text = f"{error!r}".encode()[:size - 1]
        ctypes.memmove(message, text, len(text))
        return 1


@functools.cache
def _handler() -> ctypes.CDLL | None:
    """The compiled handler, registered with XLA; None where it could not be compiled."""
    lib = native.library("ffi_handler")
    if lib is None:
        return None
    lib.fj_set_runner.argtypes = [_Runner]
    lib.fj_set_runner(_run)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.fracture_jax_native),
                                platform="cpu")
    return lib


def available() -> bool:
    """Whether native plans can run (the handler compiled and registered)."""
    return _handler() is not None


def register(plan) -> int:
    """File ``plan`` and return the number ``call`` takes."""
    if not available():
        raise RuntimeError("the native FFI handler is not available (see the warning above)")
    _PLANS.append(plan)
    return len(_PLANS) - 1


def call(plan: int, shape, *operands):
    """The float32 array of ``shape`` that plan number ``plan`` writes from ``operands`` (of
    which the first is an activation: inside ``shard_map`` the result varies as it does)."""
    return per_device(jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))(
        *operands, plan=np.int64(plan)))
