"""Native CPU kernels inside XLA's programs: one XLA FFI custom call.

A *plan* is a list of native steps (oneDNN primitives, this package's C functions) that run
on XLA's own buffers, with no copies. It is built with ``Plan`` when a program is traced and
handed to the handler once; ``call`` emits the custom call that runs it. The handler is C++
(``ffi_handler.cc``, compiled by ``native`` against the headers jaxlib ships and registered
with ``jax.ffi.register_ffi_target``) and runs every step itself: no Python, and no GIL, on a
step's path, so the steps never wait on the training loop's Python. A failing step's message
comes back to XLA, which raises it.
"""

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fracture_jax.kernels import native
from fracture_jax.kernels.sharding import per_device

TARGET = "fracture_jax_native"
ARGUMENT, RESULT, SCRATCH = 0, 1, 2  # where a step's buffer is: ffi_handler.cc's Kind
_PLANS: list = []  # every plan built, and so what its steps point at, lives with the process


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


@functools.cache
def _handler() -> ctypes.CDLL | None:
    """The compiled handler, registered with XLA; None where it could not be compiled."""
    lib = native.library("ffi_handler")
    if lib is None:
        return None
    lib.fj_plan_new.restype = ctypes.c_int64
    lib.fj_plan_scratch.restype = ctypes.c_int32
    lib.fj_plan_scratch.argtypes = [ctypes.c_int64, ctypes.c_uint64]
    lib.fj_plan_onednn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                                   *[ctypes.c_void_p] * 4]
    lib.fj_plan_function.argtypes = [ctypes.c_int64, ctypes.c_void_p, *[ctypes.c_int32] * 4,
                                     *[ctypes.c_long] * 4]
    lib.fj_set_onednn.argtypes = [ctypes.c_void_p] * 6
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.fracture_jax_native),
                                platform="cpu")
    return lib


def available() -> bool:
    """Whether native plans can run (the handler compiled and registered)."""
    return _handler() is not None


def use_onednn(lib: ctypes.CDLL, engine, stream) -> None:
    """Give the handler oneDNN's entry points, CPU engine and stream (``onednn`` loads them)."""
    _handler().fj_set_onednn(*map(_address, (lib.dnnl_memory_create, lib.dnnl_memory_destroy,
                                             lib.dnnl_primitive_execute, lib.dnnl_stream_wait)),
                             engine, stream)


class Plan:
    """A plan being built: ``scratch`` buffers, then ``onednn`` and ``function`` steps, run in
    order. A buffer is (``ARGUMENT``, i), (``RESULT``, i) or a ``scratch`` one; ``number`` is
    what ``call`` takes."""

    def __init__(self):
        if not available():
            raise RuntimeError("the native FFI handler is not available (see the warning above)")
        self._lib = _handler()
        self.number = self._lib.fj_plan_new()
        self._keep = []  # the handles and functions the handler points at
        _PLANS.append(self)

    def scratch(self, nbytes: int) -> tuple[int, int]:
        """A buffer of ``nbytes`` that lives for one run of the plan."""
        return SCRATCH, self._lib.fj_plan_scratch(self.number, nbytes)

    def onednn(self, primitive, args: dict) -> None:
        """Run oneDNN's ``primitive`` on ``{DNNL_ARG_*: (memory descriptor, buffer)}``."""
        n = len(args)
        numbers = (ctypes.c_int32 * n)(*args)
        descs = (ctypes.c_void_p * n)(*(desc for desc, _ in args.values()))
        kinds = (ctypes.c_int32 * n)(*(kind for _, (kind, _) in args.values()))
        indices = (ctypes.c_int32 * n)(*(index for _, (_, index) in args.values()))
        self._keep.append((primitive, list(args.values())))
        self._lib.fj_plan_onednn(self.number, primitive, n, numbers, descs, kinds, indices)

    def function(self, function, source: tuple, destination: tuple, sizes: tuple) -> None:
        """Run C ``int function(const void *source, void *destination, long, long, long,
        long)`` with ``sizes``; nonzero means it could not allocate its working memory."""
        self._keep.append(function)
        self._lib.fj_plan_function(self.number, _address(function), *source, *destination,
                                   *sizes)


def call(plan: int, shape, *operands):
    """The float32 array of ``shape`` that plan number ``plan`` writes from ``operands`` (of
    which the first is an activation: inside ``shard_map`` the result varies as it does)."""
    return per_device(jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))(
        *operands, plan=np.int64(plan)))
