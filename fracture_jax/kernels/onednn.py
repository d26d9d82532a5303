"""oneDNN's convolutions inside XLA's CPU programs, run by ``ffi``'s custom call.

On a 2-core AVX-512 CPU, XLA's convolution ran VGG16's 3x3 layers at 130-176 GFLOP/s, oneDNN's
direct convolution (``brgconv``, the kernel TensorFlow runs) at 221-226. This module loads
``libdnnl`` (the ``onednn-cpu-gomp`` wheel) and builds the oneDNN primitives of each convolution
shape when a program is traced, as ``ffi`` plans that run them on XLA's own buffers.
Convolutions are dense or depthwise (oneDNN's grouped convolution with one channel per group).
A forward convolution can end in an epilogue of per-channel or elementwise additions and
products and a ReLU or swish (oneDNN's post-ops), so that a bias, an inference BatchNorm, a
residual and the activation cost no extra pass over memory. Without the
library (or the compiled FFI handler) ``available()`` is False and callers keep XLA's
convolution; a library found but failing to load gets a warning that names the fix. Layouts: NHWC
activations, HWIO kernels (depthwise: (kh, kw, C, 1)), float32.
"""

import ctypes
import functools
import logging
import site
import sys
from pathlib import Path

from fracture_jax.kernels import ffi, policy

# oneDNN 3's C API constants, under their names in oneapi/dnnl/dnnl_types.h.
dnnl_f32, dnnl_format_tag_any, dnnl_cpu, dnnl_stream_in_order = 3, 1, 1, 0x1
dnnl_convolution_direct, dnnl_forward_inference, dnnl_forward_training = 0x1, 0x60, 0x40
DNNL_ARG_SRC, DNNL_ARG_SRC_1, DNNL_ARG_DST, DNNL_ARG_WEIGHTS = 1, 2, 17, 33
DNNL_ARG_DIFF_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS = 129, 145, 161
DNNL_ARG_ATTR_MULTIPLE_POST_OP_BASE = 32768
dnnl_query_weights_md, dnnl_query_diff_weights_md = 131, 132
dnnl_eltwise_relu, dnnl_eltwise_swish = 0x20, 0x2C
dnnl_binary_add, dnnl_binary_mul = 0x1FFF0, 0x1FFF1
_ELTWISE = {"relu": (dnnl_eltwise_relu, 0.0), "swish": (dnnl_eltwise_swish, 1.0)}  # alpha
_BINARY = {"add": dnnl_binary_add, "mul": dnnl_binary_mul}


def _post_op_operand(i: int) -> int:
    """``DNNL_ARG_ATTR_MULTIPLE_POST_OP(i) | DNNL_ARG_SRC_1``: post-op ``i``'s operand."""
    return DNNL_ARG_ATTR_MULTIPLE_POST_OP_BASE * (i + 1) | DNNL_ARG_SRC_1
_P = ctypes.c_void_p
_Dims = ctypes.c_int64 * 12


def _library_paths():
    if policy.switches().onednn_lib:
        yield policy.switches().onednn_lib
    for prefix in dict.fromkeys((sys.prefix, site.getuserbase(), sys.base_prefix, "/usr")):
        yield str(Path(prefix) / "lib" / "libdnnl.so.3")
    yield "libdnnl.so.3"


class _Dnnl:
    """The loaded library, its CPU engine and stream."""

    def __init__(self, lib):
        self.lib = lib
        lib.dnnl_primitive_desc_query_md.restype = _P
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        self.engine = self.create(lib.dnnl_engine_create, dnnl_cpu, 0)
        self.stream = self.create(lib.dnnl_stream_create, self.engine, dnnl_stream_in_order)
        ffi.use_onednn(lib, self.engine, self.stream)

    def check(self, status, what):
        if status != 0:
            raise RuntimeError(f"oneDNN {what} failed with status {status}")

    def create(self, fn, *args):
        handle = _P()
        self.check(fn(ctypes.byref(handle), *args), fn.__name__)
        return handle

    def desc(self, dims, strides=None):
        """A float32 memory descriptor with explicit strides, or oneDNN's choice of layout."""
        if strides is None:
            return self.create(self.lib.dnnl_memory_desc_create_with_tag, len(dims),
                               _Dims(*dims), dnnl_f32, dnnl_format_tag_any)
        return self.create(self.lib.dnnl_memory_desc_create_with_strides, len(dims),
                           _Dims(*dims), dnnl_f32, _Dims(*strides))

    def primitive(self, pd):
        return self.create(self.lib.dnnl_primitive_create, pd)

    def reorder(self, src, dst):
        return self.primitive(self.create(self.lib.dnnl_reorder_primitive_desc_create, src,
                                          self.engine, dst, self.engine, None))


@functools.cache
def _dnnl() -> "_Dnnl | None":
    s = policy.switches()
    if not s.onednn or not ffi.available():
        return None
    for path in _library_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:  # absent here
            continue
        try:
            dnnl = _Dnnl(lib)
        except (AttributeError, RuntimeError) as error:  # not oneDNN 3, or its CPU engine failed
            logging.warning("%s loaded but is not a working oneDNN 3 (%s): XLA's convolutions "
                            "run instead; pip install -r requirements.txt installs the "
                            "onednn-cpu-gomp wheel, or point FRACTURE_JAX_ONEDNN_LIB at a "
                            "libdnnl.so.3", path, error)
            continue
        dnnl.path = path
        logging.info("oneDNN convolutions from %s", path)
        return dnnl
    return None


def available() -> bool:
    """Whether oneDNN's library loaded (set FRACTURE_JAX_ONEDNN=0 to keep XLA's convolution)."""
    return _dnnl() is not None


def library_path() -> str | None:
    return _dnnl().path if available() else None


def _nhwc(dnnl, shape):
    n, h, w, c = shape
    return dnnl.desc([n, c, h, w], [h * w * c, 1, w * c, c])


def _hwio(dnnl, shape):
    kh, kw, i, o = shape
    return dnnl.desc([o, i, kh, kw], [1, o, kw * i * o, i * o])


def _depthwise_dims(shape):
    """oneDNN's grouped-weights dims (groups, out/group, in/group, kh, kw) of a (kh, kw, C, 1)
    depthwise kernel."""
    kh, kw, c, _ = shape
    return [c, 1, 1, kh, kw]


def _hwc1(dnnl, shape):
    kh, kw, c, _ = shape
    return dnnl.desc(_depthwise_dims(shape), [1, 1, 1, kw * c, c])


class _Convolution:
    """One convolution shape's descriptors: NHWC activations, an HWIO kernel (or a depthwise
    (kh, kw, C, 1) one), and the kernel in the layout oneDNN picks for each primitive."""

    def __init__(self, x_shape, kernel_shape, strides: int, padding: tuple, depthwise: bool):
        self.dnnl = dnnl = _dnnl()
        self.src = _nhwc(dnnl, x_shape)
        self.dst = _nhwc(dnnl, _out_shape(x_shape, kernel_shape, strides, padding, depthwise))
        kh, kw, cin, cout = kernel_shape
        if depthwise:
            self.kernel = _hwc1(dnnl, kernel_shape)
            self.any_kernel = dnnl.desc(_depthwise_dims(kernel_shape))
        else:
            self.kernel = _hwio(dnnl, kernel_shape)
            self.any_kernel = dnnl.desc([cout, cin, kh, kw])
        (top, bottom), (left, right) = padding
        self.geometry = (_Dims(strides, strides), _Dims(0, 0), _Dims(top, left),
                         _Dims(bottom, right))

    def forward_pd(self, prop, attr=None):
        return self.dnnl.create(self.dnnl.lib.dnnl_convolution_forward_primitive_desc_create,
                                self.dnnl.engine, prop, dnnl_convolution_direct, self.src,
                                self.any_kernel, None,
                                self.dst, *self.geometry, attr)

    def post_ops(self, epilogue: tuple):
        """oneDNN's attribute for ``epilogue`` ((op, operand shape or None), ...), and the
        (argument, descriptor) of each operand."""
        dnnl, lib = self.dnnl, self.dnnl.lib
        post_ops, operands = dnnl.create(lib.dnnl_post_ops_create), []
        for i, (op, shape) in enumerate(epilogue):
            if op in _ELTWISE:
                algorithm, alpha = _ELTWISE[op]
                status = lib.dnnl_post_ops_append_eltwise(post_ops, algorithm,
                                                          ctypes.c_float(alpha), ctypes.c_float(0))
            else:  # a (C,) operand broadcasts over the pixels
                desc = _nhwc(dnnl, shape if len(shape) == 4 else (1, 1, 1, *shape))
                status = lib.dnnl_post_ops_append_binary(post_ops, _BINARY[op], desc)
                operands.append((_post_op_operand(i), desc))
            dnnl.check(status, f"post-op {op}")
        attr = dnnl.create(lib.dnnl_primitive_attr_create)
        dnnl.check(lib.dnnl_primitive_attr_set_post_ops(attr, post_ops), "post-ops")
        return attr, operands

    def kernel_layout(self, pd, query):
        """The primitive ``pd``'s kernel layout and its size in float32s."""
        desc = _P(self.dnnl.lib.dnnl_primitive_desc_query_md(pd, query, 0))
        return desc, self.dnnl.lib.dnnl_memory_desc_get_size(desc) // 4


def _plan(build):
    """A cached plan builder: the ``ffi`` plan number per convolution shape (and the
    builder's further options)."""
    @functools.cache
    def index(x_shape, kernel_shape, strides, padding, depthwise, *options) -> int:
        plan = ffi.Plan()
        build(plan, _Convolution(x_shape, kernel_shape, strides, padding, depthwise), *options)
        return plan.number
    return index


_X, _KERNEL, _Y = (ffi.ARGUMENT, 0), (ffi.ARGUMENT, 1), (ffi.RESULT, 0)


def _with_kernel(plan: ffi.Plan, c: _Convolution, pd, source: tuple, result: tuple,
                 operands: list = ()):
    """Primitive ``pd`` reading an activation (call argument 0) and the HWIO kernel (argument
    1, copied into the primitive's layout), then ``operands`` (arguments 2, ...), and writing
    the activation (the result): ``source``, ``result`` and each operand are (oneDNN argument,
    descriptor) pairs."""
    desc, size = c.kernel_layout(pd, dnnl_query_weights_md)
    kernel = plan.scratch(4 * size)
    plan.onednn(c.dnnl.reorder(c.kernel, desc), {DNNL_ARG_SRC: (c.kernel, _KERNEL),
                                                  DNNL_ARG_DST: (desc, kernel)})
    plan.onednn(c.dnnl.primitive(pd), {
        source[0]: (source[1], _X), DNNL_ARG_WEIGHTS: (desc, kernel), result[0]: (result[1], _Y),
        **{arg: (d, (ffi.ARGUMENT, 2 + i)) for i, (arg, d) in enumerate(operands)}})


@_plan
def _forward_plan(plan: ffi.Plan, c: _Convolution, epilogue: tuple):
    attr, operands = c.post_ops(epilogue) if epilogue else (None, [])
    _with_kernel(plan, c, c.forward_pd(dnnl_forward_inference, attr), (DNNL_ARG_SRC, c.src),
                 (DNNL_ARG_DST, c.dst), operands)


@_plan
def _input_gradient_plan(plan: ffi.Plan, c: _Convolution):
    pd = c.dnnl.create(c.dnnl.lib.dnnl_convolution_backward_data_primitive_desc_create,
                       c.dnnl.engine, dnnl_convolution_direct, c.src, c.any_kernel, c.dst,
                       *c.geometry,
                       c.forward_pd(dnnl_forward_training), None)
    _with_kernel(plan, c, pd, (DNNL_ARG_DIFF_DST, c.dst), (DNNL_ARG_DIFF_SRC, c.src))


@_plan
def _kernel_gradient_plan(plan: ffi.Plan, c: _Convolution):
    pd = c.dnnl.create(c.dnnl.lib.dnnl_convolution_backward_weights_primitive_desc_create,
                       c.dnnl.engine, dnnl_convolution_direct, c.src, c.any_kernel, None, c.dst,
                       *c.geometry,
                       c.forward_pd(dnnl_forward_training), None)
    desc, size = c.kernel_layout(pd, dnnl_query_diff_weights_md)
    blocked = plan.scratch(4 * size)
    plan.onednn(c.dnnl.primitive(pd), {  # x, dy -> the kernel's gradient, blocked
        DNNL_ARG_SRC: (c.src, _X), DNNL_ARG_DIFF_DST: (c.dst, (ffi.ARGUMENT, 1)),
        DNNL_ARG_DIFF_WEIGHTS: (desc, blocked)})
    plan.onednn(c.dnnl.reorder(desc, c.kernel), {DNNL_ARG_SRC: (desc, blocked),
                                                  DNNL_ARG_DST: (c.kernel, _Y)})


def _out_shape(x_shape, kernel_shape, strides, padding, depthwise):
    (top, bottom), (left, right) = padding
    kh, kw, _, cout = kernel_shape
    return (x_shape[0], (x_shape[1] + top + bottom - kh) // strides + 1,
            (x_shape[2] + left + right - kw) // strides + 1, x_shape[3] if depthwise else cout)


def forward(x, kernel, strides: int, padding: tuple, epilogue=(), depthwise: bool = False):
    """The convolution of NHWC ``x`` by HWIO ``kernel`` (``depthwise``: by a (kh, kw, C, 1)
    kernel, channel by channel); ``padding`` is explicit: ((top, bottom), (left, right)).
    ``epilogue`` is applied in order to the result, in the same call: ("add", v) and
    ("mul", v) with ``v`` of shape (C,) or the output's, then optionally ("relu", None) or
    ("swish", None)."""
    shape = (x.shape, kernel.shape, strides, padding, depthwise)
    plan = _forward_plan(*shape, tuple((op, v if v is None else v.shape) for op, v in epilogue))
    operands = [v for _, v in epilogue if v is not None]
    return ffi.call(plan, _out_shape(*shape), x, kernel, *operands)


def input_gradient(dy, kernel, x_shape, strides: int, padding: tuple, depthwise: bool = False):
    return ffi.call(_input_gradient_plan(x_shape, kernel.shape, strides, padding, depthwise),
                 x_shape, dy, kernel)


def kernel_gradient(x, dy, kernel_shape, strides: int, padding: tuple, depthwise: bool = False):
    return ffi.call(_kernel_gradient_plan(x.shape, kernel_shape, strides, padding, depthwise),
                 kernel_shape, x, dy)
