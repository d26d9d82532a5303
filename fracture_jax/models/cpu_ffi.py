"""Native CPU kernels inside XLA's programs: one XLA FFI custom call, written in ctypes.

A *plan* is a Python callable ``plan(argument addresses, result addresses)`` that runs native
code (oneDNN's primitives, this package's C kernels) on XLA's own buffers, with no copies.
``register`` files a plan when a program is traced and returns its number; ``call`` emits the
custom call that runs it. One FFI handler serves every plan: it reads the plan's number from
the call's attribute and reports a plan's exception to XLA, which raises it.
"""

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "fracture_jax_native"
_P = ctypes.c_void_p
_PLANS: list = []


# The parts of XLA's FFI C API (xla/ffi/api/c_api.h, version 0.3) the handler reads.
class _Extension(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", _P)]


class _Version(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _P),
                ("major", ctypes.c_int), ("minor", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _Version),
                ("traits", ctypes.c_uint32)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("base", _Extension), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _P), ("dtype", ctypes.c_int),
                ("data", _P), ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _List(ctypes.Structure):  # XLA_FFI_Args, XLA_FFI_Rets and XLA_FFI_Attrs share a prefix
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _P), ("size", ctypes.c_int64),
                ("types", _P), ("items", ctypes.POINTER(_P))]


class _Attrs(ctypes.Structure):
    _fields_ = [*_List._fields_[:4], ("names", _P), ("items", ctypes.POINTER(_P))]


class _Scalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", ctypes.POINTER(ctypes.c_int64))]


class _ErrorArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _P),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


class _Api(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", _P),
                ("api_version", _Version), ("internal_api", _P),
                ("error_create", ctypes.CFUNCTYPE(_P, ctypes.POINTER(_ErrorArgs)))]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("extension_start", ctypes.POINTER(_Extension)),
                ("api", ctypes.POINTER(_Api)), ("ctx", _P), ("stage", ctypes.c_int),
                ("args", _List), ("rets", _List), ("attrs", _Attrs), ("future", _P)]


@ctypes.CFUNCTYPE(_P, ctypes.POINTER(_CallFrame))
def _handler(frame_pointer):
    frame = frame_pointer.contents
    if frame.extension_start and frame.extension_start.contents.type == 1:  # metadata query
        metadata = ctypes.cast(frame.extension_start,
                               ctypes.POINTER(_MetadataExtension)).contents.metadata.contents
        metadata.api_version.major, metadata.api_version.minor, metadata.traits = 0, 3, 0
        return None
    if frame.stage != 3:  # only the execute stage does work
        return None
    try:
        plan = _PLANS[ctypes.cast(frame.attrs.items[0], ctypes.POINTER(_Scalar)).contents.value[0]]
        address = lambda items, i: ctypes.cast(items[i], ctypes.POINTER(_Buffer)).contents.data
        plan([address(frame.args.items, i) for i in range(frame.args.size)],
             [address(frame.rets.items, i) for i in range(frame.rets.size)])
        return None
    except Exception as error:  # noqa: BLE001 -- reported to XLA, which raises it
        args = _ErrorArgs(ctypes.sizeof(_ErrorArgs), None, f"native kernel: {error!r}".encode(), 13)
        return frame.api.contents.error_create(ctypes.byref(args))


@functools.cache
def _register_target():
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(_handler), platform="cpu")


def register(plan) -> int:
    """File ``plan`` and return the number ``call`` takes."""
    _register_target()
    _PLANS.append(plan)
    return len(_PLANS) - 1


def call(plan: int, shape, *operands):
    """The float32 array of ``shape`` that plan number ``plan`` writes from ``operands``."""
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))(
        *operands, plan=np.int64(plan))
